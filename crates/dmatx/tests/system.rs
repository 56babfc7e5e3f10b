//! System-mode DMA in the core (spec §2.1 configure, §2.4–§2.6, §3.5, §3.10; statements 13, 14,
//! 79–80, 85–91), over the mock platform, whose "controller" the tests drive by hand. The
//! simulated platform's controller, with data movement, is exercised by the sample tests.

mod common;

use common::mock::{MockBuffer, MockPlatform, UNKNOWN_REQUEST_LINE};
use dmatx::hal::{DmaWidth, SystemDmaStatus};
use dmatx::{
    Call, Completion, Direction, DmaDescriptor, DmaDevice, Enabler, EnablerConfig, Error, Profile,
    SgElement, State, SystemProfileConfig, SystemStopOutcome, Transaction,
};
use std::sync::{Arc, Mutex};

const W: Direction = Direction::WriteToDevice;
const R: Direction = Direction::ReadFromDevice;

/// What the callbacks saw, in order.
#[derive(Default)]
struct Seen {
    events: Mutex<Vec<String>>,
    inside_program: Mutex<bool>,
    /// Configure callback answer.
    configure_answer: Mutex<bool>,
    /// Complete the transfer from inside the configure callback (with final 0).
    final_in_configure: Mutex<bool>,
    /// Run the controller from inside program-DMA (its completion must wait).
    finish_inside_program: Mutex<Option<MockPlatform>>,
    /// Report each completion from the transfer-complete callback.
    complete_in_callback: Mutex<bool>,
    results: Mutex<Vec<Completion>>,
}

impl Seen {
    fn new() -> Arc<Self> {
        let s = Arc::new(Self::default());
        *s.configure_answer.lock().unwrap() = true;
        *s.complete_in_callback.lock().unwrap() = true;
        s
    }
    fn events(&self) -> Vec<String> {
        self.events.lock().unwrap().clone()
    }
    fn log(&self, e: String) {
        self.events.lock().unwrap().push(e);
    }
}

type Tx = Transaction<MockPlatform, Arc<Seen>, MockBuffer>;

fn program(t: &Tx, seen: &Arc<Seen>, _: Direction, sg: &[SgElement]) -> bool {
    *seen.inside_program.lock().unwrap() = true;
    seen.log(format!("program {}", t.current_transfer_length()));
    assert!(!sg.is_empty());
    let platform = seen.finish_inside_program.lock().unwrap().clone();
    if let Some(p) = platform {
        assert!(p.finish_system_transfer(), "a transfer is running");
    }
    *seen.inside_program.lock().unwrap() = false;
    true
}

fn configure(t: &Tx, seen: &Arc<Seen>, offset: u64, length: u64) -> bool {
    seen.log(format!("configure {offset}+{length}"));
    if *seen.final_in_configure.lock().unwrap() {
        let r = t.dma_completed_final(0).expect("final inside configure");
        seen.results.lock().unwrap().push(r);
    }
    *seen.configure_answer.lock().unwrap()
}

fn done(t: &Tx, seen: &Arc<Seen>, _: Direction, status: SystemDmaStatus) {
    assert!(
        !*seen.inside_program.lock().unwrap(),
        "transfer-complete during program-DMA"
    );
    seen.log(format!("done {status:?}"));
    if *seen.complete_in_callback.lock().unwrap() {
        let r = match status {
            SystemDmaStatus::Complete => t.dma_completed(),
            SystemDmaStatus::Error { moved } | SystemDmaStatus::Cancelled { moved } => {
                t.dma_completed_final(moved)
            }
        }
        .expect("completion is not misuse");
        seen.results.lock().unwrap().push(r);
    }
}

fn descriptor() -> DmaDescriptor {
    DmaDescriptor {
        channel: 2,
        request_line: 7,
    }
}

fn system_config() -> SystemProfileConfig {
    SystemProfileConfig::new(0x7000_6200, DmaWidth::Bits8, descriptor())
}

/// A configured simplex system enabler with N map registers (F = (N − 1) pages).
fn setup(n: u32) -> (MockPlatform, Enabler<MockPlatform>) {
    let platform = MockPlatform::new(n);
    let device = DmaDevice::new(platform.clone());
    let e = Enabler::create(
        &device,
        EnablerConfig::new(Profile::System, 1 << 20).with_verifier(false),
    )
    .unwrap();
    e.configure_system_profile(system_config(), W).unwrap();
    (platform, e)
}

/// A transaction with the transfer-complete callback, initialized to write `length` bytes.
fn initialized(e: &Enabler<MockPlatform>, length: u64) -> Arc<Tx> {
    let t = tx(e);
    t.initialize_using_offset(program, W, MockBuffer::new(length), 0, length)
        .unwrap();
    t
}

/// Release `t`, drop it, and check the platform is back to rest.
fn release_and_check(platform: &MockPlatform, t: Arc<Tx>) {
    t.release().unwrap();
    drop(t);
    platform.assert_clean();
}

fn tx(e: &Enabler<MockPlatform>) -> Arc<Tx> {
    let t = Tx::create(e).unwrap();
    t.set_transfer_complete_callback(Some(done)).unwrap();
    t
}

#[test]
fn stmt_013_configuring_twice_or_a_bus_master_enabler_is_invalid_parameter() {
    let (platform, e) = setup(4);
    assert_eq!(
        e.configure_system_profile(system_config(), W),
        Err(Error::InvalidParameter),
        "same direction again"
    );
    assert_eq!(
        e.configure_system_profile(system_config(), R),
        Err(Error::InvalidParameter),
        "a simplex enabler ignores the direction: it has its channel"
    );
    let device = DmaDevice::new(platform.clone());
    let master = Enabler::create(&device, EnablerConfig::new(Profile::Packet64, 4096)).unwrap();
    assert_eq!(
        master.configure_system_profile(system_config(), W),
        Err(Error::InvalidParameter)
    );
    assert_eq!(platform.books.lock().unwrap().channels.len(), 1);
    platform.assert_clean();
}

#[test]
fn stmt_014_a_null_descriptor_is_invalid_parameter() {
    let platform = MockPlatform::new(4);
    let device = DmaDevice::new(platform.clone());
    let e = Enabler::create(&device, EnablerConfig::new(Profile::System, 4096)).unwrap();
    let mut config = system_config();
    config.descriptor = None;
    assert_eq!(
        e.configure_system_profile(config, W),
        Err(Error::InvalidParameter)
    );
    assert!(!e.is_configured());
    assert_eq!(
        SystemProfileConfig::from_raw(0x18, system_config()),
        Err(Error::InfoLengthMismatch)
    );
    assert!(SystemProfileConfig::from_raw(SystemProfileConfig::RAW_SIZE, system_config()).is_ok());
}

#[test]
fn an_unknown_request_line_fails_configuration_and_transactions_wait_for_it() {
    let platform = MockPlatform::new(4);
    let device = DmaDevice::new(platform.clone());
    let e = Enabler::create(&device, EnablerConfig::new(Profile::System, 4096)).unwrap();
    let unknown = DmaDescriptor {
        channel: 2,
        request_line: UNKNOWN_REQUEST_LINE,
    };
    assert_eq!(
        e.configure_system_profile(SystemProfileConfig::new(0, DmaWidth::Bits8, unknown), W),
        Err(Error::Unsuccessful)
    );
    assert_eq!(e.fragment_length(W), 0);
    assert_eq!(
        Tx::create(&e).err(),
        Some(Error::InvalidDeviceState),
        "quirks 73"
    );
    e.configure_system_profile(system_config(), W).unwrap();
    assert!(e.is_configured());
    assert_eq!(
        e.fragment_length(W),
        4096,
        "min(MaximumLength, (N − 1) pages)"
    );
    assert!(Tx::create(&e).is_ok());
}

#[test]
fn a_duplex_system_enabler_has_one_channel_per_direction() {
    let platform = MockPlatform::new(4);
    let device = DmaDevice::new(platform.clone());
    let e = Enabler::create(&device, EnablerConfig::new(Profile::SystemDuplex, 4096)).unwrap();
    e.configure_system_profile(system_config(), R).unwrap();
    assert!(!e.is_configured(), "the write direction has no channel yet");
    assert_eq!(Tx::create(&e).err(), Some(Error::InvalidDeviceState));
    let mut write = system_config();
    write.descriptor = Some(DmaDescriptor {
        channel: 3,
        request_line: 8,
    });
    e.configure_system_profile(write, W).unwrap();
    assert!(e.is_configured());
    let channels = platform.books.lock().unwrap().channels.clone();
    assert_eq!(
        channels.iter().map(|c| c.channel).collect::<Vec<_>>(),
        [2, 3]
    );
    assert_eq!(
        e.configure_system_profile(write, W),
        Err(Error::InvalidParameter)
    );
}

#[test]
fn a_system_transaction_runs_each_transfer_through_the_controller() {
    // F = 3 pages: a 20 000-byte write is two transfers; each is configured, mapped,
    // programmed, finished by the controller and reported from the transfer-complete callback.
    let (platform, e) = setup(4);
    let t = initialized(&e, 20_000);
    t.set_channel_configuration_callback(Some(configure))
        .unwrap();
    let seen = Seen::new();
    t.execute(Arc::clone(&seen)).unwrap();
    assert!(platform.finish_system_transfer());
    assert!(platform.finish_system_transfer());
    assert!(!platform.finish_system_transfer(), "nothing more runs");
    assert_eq!(
        seen.events(),
        [
            "configure 0+12288",
            "program 12288",
            "done Complete",
            "configure 12288+7712",
            "program 7712",
            "done Complete",
        ]
    );
    assert_eq!(
        *seen.results.lock().unwrap(),
        [
            Completion::MoreProcessingRequired,
            Completion::Finished(Ok(()))
        ]
    );
    assert_eq!(t.bytes_transferred(), 20_000);
    release_and_check(&platform, t);
}

#[test]
fn the_channel_is_held_from_the_first_grant_to_release() {
    let (platform, e) = setup(4);
    let (a, b) = (tx(&e), tx(&e));
    for t in [&a, &b] {
        t.initialize_using_offset(program, W, MockBuffer::new(4096), 0, 4096)
            .unwrap();
    }
    platform.books.lock().unwrap().queueing = true;
    let (sa, sb) = (Seen::new(), Seen::new());
    a.execute(Arc::clone(&sa)).unwrap();
    b.execute(Arc::clone(&sb)).unwrap();
    assert_eq!(platform.queued(), 1, "b waits for the channel");
    assert!(platform.finish_system_transfer());
    assert_eq!(a.state(), State::TransferCompleted);
    assert_eq!(
        platform.queued(),
        1,
        "a finished but still owns the channel"
    );
    assert!(sb.events().is_empty());
    a.release().unwrap();
    assert_eq!(sb.events(), ["program 4096"], "b runs once a releases");
    assert!(platform.finish_system_transfer());
    assert_eq!(b.state(), State::TransferCompleted);
    b.release().unwrap();
    drop((a, b));
    platform.assert_clean();
}

#[test]
fn stmt_079_system_callbacks_survive_release() {
    let (platform, e) = setup(4);
    let t = tx(&e);
    t.set_channel_configuration_callback(Some(configure))
        .unwrap();
    for round in 0..2 {
        t.initialize_using_offset(program, W, MockBuffer::new(4096), 0, 4096)
            .unwrap();
        let seen = Seen::new();
        t.execute(Arc::clone(&seen)).unwrap();
        assert!(platform.finish_system_transfer());
        assert_eq!(
            seen.events(),
            ["configure 0+4096", "program 4096", "done Complete"],
            "round {round}"
        );
        t.release().unwrap();
    }
    // `None` clears them: without a transfer-complete callback nothing reports the transfer.
    t.set_transfer_complete_callback(None).unwrap();
    t.set_channel_configuration_callback(None).unwrap();
    t.initialize_using_offset(program, W, MockBuffer::new(4096), 0, 4096)
        .unwrap();
    let seen = Seen::new();
    t.execute(Arc::clone(&seen)).unwrap();
    assert!(platform.finish_system_transfer());
    assert_eq!(seen.events(), ["program 4096"]);
    assert_eq!(t.dma_completed(), Ok(Completion::Finished(Ok(()))));
    release_and_check(&platform, t);
}

#[test]
fn stmt_080_the_device_address_offset_is_set_after_initialize_and_applies_to_every_transfer() {
    let (platform, e) = setup(2);
    let t = tx(&e);
    assert_eq!(
        t.set_device_address_offset(0x40),
        Err(Error::InvalidDeviceRequest)
    );
    t.initialize_using_offset(program, W, MockBuffer::new(8192), 0, 8192)
        .unwrap();
    t.set_device_address_offset(0x40).unwrap();
    let seen = Seen::new();
    t.execute(Arc::clone(&seen)).unwrap();
    while platform.finish_system_transfer() {}
    assert_eq!(t.state(), State::TransferCompleted);
    assert_eq!(
        platform.system_maps(),
        [(0, 4096, 0x40), (4096, 4096, 0x40)]
    );
    t.release().unwrap();
    t.initialize_using_offset(program, W, MockBuffer::new(4096), 0, 4096)
        .unwrap();
    assert_eq!(t.device_address_offset(), 0, "initialize resets it");
    release_and_check(&platform, t);
}

#[test]
fn stmt_085_stop_on_a_non_system_transaction_is_refused() {
    let platform = MockPlatform::new(4);
    let device = DmaDevice::new(platform.clone());
    let e = Enabler::create(&device, EnablerConfig::new(Profile::Packet64, 4096)).unwrap();
    let t = Tx::create(&e).unwrap();
    assert_eq!(t.stop_system_transfer(), Err(Error::InvalidDeviceRequest));
    assert_eq!(
        t.set_transfer_complete_callback(Some(done)),
        Err(Error::InvalidDeviceRequest)
    );
    assert_eq!(
        t.set_channel_configuration_callback(Some(configure)),
        Err(Error::InvalidDeviceRequest)
    );
    assert_eq!(t.state(), State::Created);
}

#[test]
fn stmt_086_087_088_stop_during_a_transfer_reports_cancelled_and_ends_the_transaction() {
    let (platform, e) = setup(2);
    let t = initialized(&e, 8192);
    let seen = Seen::new();
    // The driver reports the stopped transfer with a plain completion: it needs another
    // transfer, so it finishes with Cancelled (87).
    *seen.complete_in_callback.lock().unwrap() = false;
    t.execute(Arc::clone(&seen)).unwrap();
    assert_eq!(t.stop_system_transfer(), Ok(SystemStopOutcome::Stopping));
    let again = t.stop_system_transfer().unwrap_err();
    assert_eq!(
        again.misuse().map(|m| m.call),
        Some(Call::StopSystemTransfer),
        "88"
    );
    assert!(platform.finish_system_transfer_with(SystemDmaStatus::Complete));
    assert_eq!(
        seen.events(),
        ["program 4096", "done Cancelled { moved: 0 }"],
        "86"
    );
    assert_eq!(
        t.dma_completed(),
        Ok(Completion::Finished(Err(Error::Cancelled)))
    );
    assert_eq!(t.state(), State::TransferFailed);
    assert_eq!(t.stop_system_transfer(), Ok(SystemStopOutcome::NotRunning));
    release_and_check(&platform, t);
}

#[test]
fn stmt_089_a_stop_before_the_first_transfer_is_reported_without_program_dma() {
    let (platform, e) = setup(4);
    let t = initialized(&e, 8192);
    assert_eq!(t.stop_system_transfer(), Ok(SystemStopOutcome::NotRunning));
    let seen = Seen::new();
    t.execute(Arc::clone(&seen)).unwrap();
    assert_eq!(
        seen.events(),
        ["done Cancelled { moved: 0 }"],
        "no program-DMA"
    );
    assert_eq!(
        *seen.results.lock().unwrap(),
        [Completion::Finished(Ok(()))],
        "the driver's final completion of 0 bytes ends it"
    );
    assert!(platform.system_maps().is_empty(), "nothing was mapped");
    assert_eq!(t.bytes_transferred(), 0);
    release_and_check(&platform, t);
}

#[test]
fn a_stopped_first_transfer_without_a_callback_finishes_the_transaction() {
    // KMDF leaves this transaction in Transfer forever (quirks 39).
    let (platform, e) = setup(4);
    let t = Tx::create(&e).unwrap();
    t.initialize_using_offset(program, W, MockBuffer::new(4096), 0, 4096)
        .unwrap();
    t.stop_system_transfer().unwrap();
    let seen = Seen::new();
    assert_eq!(t.execute(Arc::clone(&seen)), Err(Error::Cancelled));
    assert_eq!(t.state(), State::TransferFailed);
    assert!(seen.events().is_empty());
    release_and_check(&platform, t);
}

#[test]
fn stop_while_waiting_for_the_channel_withdraws_and_finishes() {
    let (platform, e) = setup(4);
    platform.books.lock().unwrap().queueing = true;
    let (a, b) = (tx(&e), Tx::create(&e).unwrap());
    for t in [&a, &b] {
        t.initialize_using_offset(program, W, MockBuffer::new(4096), 0, 4096)
            .unwrap();
    }
    let (sa, sb) = (Seen::new(), Seen::new());
    a.execute(Arc::clone(&sa)).unwrap();
    b.execute(Arc::clone(&sb)).unwrap();
    assert_eq!(b.stop_system_transfer(), Ok(SystemStopOutcome::Withdrawn));
    assert_eq!(b.state(), State::TransferFailed);
    assert_eq!(platform.queued(), 0);
    assert!(platform.finish_system_transfer());
    a.release().unwrap();
    assert!(sb.events().is_empty(), "b never ran");
    b.release().unwrap();
    drop((a, b));
    platform.assert_clean();
}

#[test]
fn stmt_090_a_completion_during_program_dma_waits_for_it() {
    let (platform, e) = setup(2);
    let t = initialized(&e, 8192);
    let seen = Seen::new();
    // The controller finishes each transfer while program-DMA is still running.
    *seen.finish_inside_program.lock().unwrap() = Some(platform.clone());
    t.execute(Arc::clone(&seen)).unwrap();
    assert_eq!(
        seen.events(),
        [
            "program 4096",
            "done Complete",
            "program 4096",
            "done Complete"
        ]
    );
    assert_eq!(t.state(), State::TransferCompleted);
    *seen.finish_inside_program.lock().unwrap() = None;
    release_and_check(&platform, t);
}

#[test]
fn stmt_091_a_false_channel_configuration_suppresses_mapping_and_program_dma() {
    let (platform, e) = setup(4);
    let t = initialized(&e, 4096);
    t.set_channel_configuration_callback(Some(configure))
        .unwrap();
    let seen = Seen::new();
    *seen.configure_answer.lock().unwrap() = false;
    *seen.final_in_configure.lock().unwrap() = true;
    t.execute(Arc::clone(&seen)).unwrap();
    assert_eq!(seen.events(), ["configure 0+4096"]);
    assert_eq!(
        *seen.results.lock().unwrap(),
        [Completion::Finished(Ok(()))]
    );
    assert!(platform.system_maps().is_empty());
    assert_eq!(
        (t.state(), t.bytes_transferred()),
        (State::TransferCompleted, 0)
    );
    release_and_check(&platform, t);
}

#[test]
fn a_system_reservation_takes_the_whole_channel() {
    let (platform, e) = setup(4);
    let t = initialized(&e, 4096);
    fn reserved(_: &Tx, seen: &Arc<Seen>) {
        seen.log("reserved".into());
    }
    let seen = Seen::new();
    t.allocate_resources(W, 0, reserved, Arc::clone(&seen))
        .unwrap();
    assert_eq!(t.reserved_map_registers(), 4, "system: all N");
    assert_eq!(seen.events(), ["reserved"]);
    t.initialize_using_offset(program, W, MockBuffer::new(4096), 0, 4096)
        .unwrap();
    t.execute(Arc::clone(&seen)).unwrap();
    assert!(platform.finish_system_transfer());
    assert_eq!(t.state(), State::TransferCompleted);
    t.free_resources().unwrap();
    drop(t);
    platform.assert_clean();
}

fn done_twice(t: &Tx, seen: &Arc<Seen>, _: Direction, _: SystemDmaStatus) {
    let first = t.dma_completed().expect("the first completion is fine");
    seen.results.lock().unwrap().push(first);
    let second = t.dma_completed();
    seen.log(format!(
        "second {:?}",
        second.map_err(|e| e.misuse().map(|m| m.call))
    ));
}

#[test]
fn a_transfer_complete_callback_completing_twice_gets_misuse_and_nothing_is_lost() {
    let (platform, e) = setup(2);
    let t = Tx::create(&e).unwrap();
    t.set_transfer_complete_callback(Some(done_twice)).unwrap();
    t.initialize_using_offset(program, W, MockBuffer::new(8192), 0, 8192)
        .unwrap();
    let seen = Seen::new();
    t.execute(Arc::clone(&seen)).unwrap();
    assert!(platform.finish_system_transfer());
    // The second completion of transfer 1 comes while transfer 2 is staged and unreported:
    // it is refused (no transfer is due), and the transaction goes on.
    assert!(platform.finish_system_transfer());
    let events = seen.events();
    assert_eq!(events[0], "program 4096");
    assert!(
        events
            .iter()
            .filter(|e| e.starts_with("second Err(Some(DmaCompleted))"))
            .count()
            >= 1,
        "{events:?}"
    );
    assert_eq!(t.state(), State::TransferCompleted);
    assert_eq!(t.bytes_transferred(), 8192);
    release_and_check(&platform, t);
}
