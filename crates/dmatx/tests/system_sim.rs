//! System-mode DMA end to end over the simulated controller: scenario X3 of `samples.md`
//! (Microsoft's SystemDma sample on KMDF's System profile) — an unknown request line fails the
//! configuration; with a known one, a two-page buffer of 0xDA lands in the device FIFO at
//! 0x70006200, the transfer-complete callback reports `DmaComplete`, the completion finishes
//! the transaction, and releasing it gives the channel back.

use dmatx::hal::{DmaWidth, SystemDmaStatus};
use dmatx::{
    Direction, DmaDescriptor, DmaDevice, Enabler, EnablerConfig, Error, Profile, SgElement, State,
    SystemProfileConfig, Transaction,
};
use dmatx_sim::{SimBuffer, SimConfig, SimPlatform, SystemCompletion, SystemDmaConfig};
use std::sync::{Arc, Mutex};

const UART_TX: u64 = 0x7000_6200;
const CHANNEL: u32 = 5;
const REQUEST_LINE: u32 = 0x1000;

#[derive(Default)]
struct Seen {
    events: Mutex<Vec<String>>,
}

type Tx = Transaction<SimPlatform, Arc<Seen>, SimBuffer>;

fn program(_: &Tx, seen: &Arc<Seen>, _: Direction, sg: &[SgElement]) -> bool {
    let bytes: u64 = sg.iter().map(|e| u64::from(e.length)).sum();
    seen.events.lock().unwrap().push(format!("program {bytes}"));
    true
}

fn done(t: &Tx, seen: &Arc<Seen>, _: Direction, status: SystemDmaStatus) {
    let answer = t.dma_completed().expect("completion");
    seen.events
        .lock()
        .unwrap()
        .push(format!("done {status:?} -> {answer:?}"));
}

fn config(request_line: u32) -> SystemProfileConfig {
    SystemProfileConfig::new(
        UART_TX,
        DmaWidth::Bits8,
        DmaDescriptor {
            channel: CHANNEL,
            request_line,
        },
    )
}

#[test]
fn x3_system_dma_port_moves_two_pages_of_0xda_into_the_fifo() {
    let sim = SimConfig::new()
        .system_dma(
            SystemDmaConfig::new()
                .channel(CHANNEL, REQUEST_LINE)
                .map_registers(3)
                .mode(SystemCompletion::Manual),
        )
        .build()
        .unwrap();
    let controller = sim.system_dma().unwrap();
    let fifo = sim.add_fifo(UART_TX, 1 << 16).unwrap();
    let device = DmaDevice::new(sim.clone());
    let e = Enabler::create(
        &device,
        EnablerConfig::new(Profile::System, 2 * 4096).with_verifier(false),
    )
    .unwrap();
    // An unknown request line: the configuration fails (the sample gets STATUS_NO_MATCH).
    assert_eq!(
        e.configure_system_profile(config(0x2000), Direction::WriteToDevice),
        Err(Error::Unsuccessful)
    );
    e.configure_system_profile(config(REQUEST_LINE), Direction::WriteToDevice)
        .unwrap();
    let t = Tx::create(&e).unwrap();
    t.set_transfer_complete_callback(Some(done)).unwrap();
    let mut buffer = sim.allocate_buffer(8192, 0).unwrap();
    buffer.fill(0xDA);
    t.initialize_using_offset(program, Direction::WriteToDevice, buffer, 0, 8192)
        .unwrap();
    let seen = Arc::new(Seen::default());
    t.execute(Arc::clone(&seen)).unwrap();
    assert!(controller.channel_owned(CHANNEL));
    assert!(
        fifo.take_received().is_empty(),
        "nothing moves before the controller runs"
    );
    assert_eq!(controller.run_pending(), 1);
    assert_eq!(
        *seen.events.lock().unwrap(),
        [
            "program 8192".to_owned(),
            "done Complete -> Finished(Ok(()))".to_owned()
        ]
    );
    assert_eq!(fifo.take_received(), vec![0xDA; 8192]);
    assert_eq!(t.state(), State::TransferCompleted);
    assert!(controller.channel_owned(CHANNEL), "held until release");
    let buffer = t.release().unwrap().expect("the buffer comes back");
    assert!(
        !controller.channel_owned(CHANNEL),
        "the channel is released"
    );
    drop((buffer, t));
    sim.check_clean().unwrap();
}
