//! The runtime's low-memory knob: object creations on a device fail as planned.

use dmatx::{Error, Profile};
use dmatx_runtime::{
    Device, Dispatch, Interrupt, InterruptConfig, Queue, QueueConfig, Timer, TimerConfig,
};
use dmatx_sim::SimBuffer;

fn isr(_: &Interrupt<()>, _: u32) -> bool {
    false
}

fn tick(_: &Timer<()>) {}

#[test]
fn planned_failures_refuse_queues_interrupts_timers_and_transactions() {
    let device = Device::new(());
    device.fail_next_allocations(4);
    let queue = Queue::<(), SimBuffer>::create(&device, QueueConfig::new(Dispatch::Parallel));
    assert_eq!(queue.err(), Some(Error::InsufficientResources));
    let interrupt = Interrupt::create(&device, InterruptConfig { isr, dpc: None });
    assert_eq!(interrupt.err(), Some(Error::InsufficientResources));
    let timer = Timer::create(&device, TimerConfig { callback: tick });
    assert_eq!(timer.err(), Some(Error::InsufficientResources));
    let sim = dmatx_sim::SimPlatform::new();
    let dma = dmatx::DmaDevice::new(sim.clone());
    let enabler =
        dmatx::Enabler::create(&dma, dmatx::EnablerConfig::new(Profile::Packet64, 4096)).unwrap();
    type Tx = dmatx::Transaction<dmatx_sim::SimPlatform, (), SimBuffer>;
    let refused: dmatx::Result<std::sync::Arc<Tx>> =
        dmatx_runtime::dma::create_transaction(&device, &enabler);
    assert_eq!(refused.err(), Some(Error::InsufficientResources));
    // The plan is used up: creations work again.
    let t: std::sync::Arc<Tx> = dmatx_runtime::dma::create_transaction(&device, &enabler).unwrap();
    assert!(Queue::<(), SimBuffer>::create(&device, QueueConfig::new(Dispatch::Parallel)).is_ok());
    assert_eq!(device.allocation_counts(), (4, 2));
    // Random: about half, and the same sequence for the same seed.
    let draw = |seed| {
        device.fail_allocations_randomly(0.5, seed);
        (0..1000)
            .map(|_| Timer::create(&device, TimerConfig { callback: tick }).is_err())
            .collect::<Vec<_>>()
    };
    let first = draw(3);
    assert_eq!(first, draw(3));
    let failed = first.iter().filter(|f| **f).count();
    assert!((400..600).contains(&failed), "{failed} of 1000 failed");
    device.fail_allocations_randomly(0.0, 0);
    device.delete().unwrap();
    drop(t);
    sim.check_clean().unwrap();
}
