//! Tests of the system DMA controller through direct calls on system adapters.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use dmatx_hal::{
    Adapter, Allocation, AllocationRequest, AllocationWaiter, DeviceDescription, Direction,
    DmaWidth, Error, MapRegisters, Mapping, Platform, SgElement, SystemChannel, SystemDmaStatus,
    SystemStop, Waiter, WaiterRef,
};

use crate::prelude::*;

const CH: u32 = 5;
const LINE: u32 = 17;
/// The device FIFO of samples X3.
const FIFO_AT: u64 = 0x7000_6200;
const N: u32 = 4;

/// A waiter that records what it is told, and whether it was called while the test said a
/// call into the adapter was under way.
#[derive(Default)]
struct Probe {
    grants: Mutex<Vec<MapRegisters>>,
    done: Mutex<Vec<SystemDmaStatus>>,
    busy: AtomicBool,
    called_while_busy: AtomicBool,
    on_done: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl AllocationWaiter for Probe {
    fn granted(&self, registers: MapRegisters) {
        if self.busy.load(SeqCst) {
            self.called_while_busy.store(true, SeqCst);
        }
        self.grants.lock().unwrap().push(registers);
    }

    fn system_transfer_done(&self, status: SystemDmaStatus) {
        if self.busy.load(SeqCst) {
            self.called_while_busy.store(true, SeqCst);
        }
        self.done.lock().unwrap().push(status);
        let reaction = self.on_done.lock().unwrap().take();
        if let Some(f) = reaction {
            f();
        }
    }
}

impl Probe {
    fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn weak(self: &Arc<Self>) -> WaiterRef {
        let strong: Waiter = Arc::clone(self) as Waiter;
        Arc::downgrade(&strong)
    }

    fn done(&self) -> Vec<SystemDmaStatus> {
        self.done.lock().unwrap().clone()
    }

    fn take_grant(&self) -> Option<MapRegisters> {
        self.grants.lock().unwrap().pop()
    }
}

fn channel(width: DmaWidth) -> SystemChannel {
    SystemChannel {
        channel: CH,
        request_line: LINE,
        demand_mode: true,
        looped_transfer: false,
        width,
        device_address: FIFO_AT,
    }
}

fn desc(width: DmaWidth) -> DeviceDescription {
    SimPlatform::system_description(channel(width))
}

struct Rig {
    sim: SimPlatform,
    dma: SimSystemDma,
    adapter: SimAdapter,
    fifo: SimFifo,
}

fn rig_with(mode: SystemCompletion, width: DmaWidth) -> Rig {
    let sim = SimConfig::new()
        .system_dma(
            SystemDmaConfig::new()
                .channel(CH, LINE)
                .channel(CH, LINE + 1)
                .channel(6, 30)
                .map_registers(N)
                .mode(mode),
        )
        .build()
        .unwrap();
    let dma = sim.system_dma().unwrap();
    let fifo = sim.add_fifo(FIFO_AT, 1 << 16).unwrap();
    let adapter = sim.adapter(&desc(width)).unwrap();
    Rig {
        sim,
        dma,
        adapter,
        fifo,
    }
}

fn rig(mode: SystemCompletion) -> Rig {
    rig_with(mode, DmaWidth::Bits8)
}

fn req(count: u32, immediate: bool) -> AllocationRequest {
    AllocationRequest {
        count: NonZeroU32::new(count).unwrap(),
        immediate,
    }
}

fn grant(a: &SimAdapter, probe: &Arc<Probe>) -> MapRegisters {
    match a.allocate(req(N, true), &probe.weak()) {
        Ok(Allocation::Granted(r)) => r,
        other => panic!("expected the channel, got {other:?}"),
    }
}

/// `map_system` with the probe marked busy around the call.
#[allow(clippy::too_many_arguments)]
fn map_system(
    a: &SimAdapter,
    regs: &MapRegisters,
    buffer: &SimBuffer,
    offset: u64,
    length: u64,
    direction: Direction,
    device_offset: u64,
    probe: &Arc<Probe>,
) -> Mapping {
    let mut sg = [SgElement::default(); 8];
    probe.busy.store(true, SeqCst);
    let m = a
        .map_system(
            regs,
            buffer,
            offset,
            length,
            direction,
            device_offset,
            &probe.weak(),
            &mut sg,
        )
        .unwrap();
    probe.busy.store(false, SeqCst);
    m
}

fn stop(a: &SimAdapter, probe: &Arc<Probe>) -> SystemStop {
    probe.busy.store(true, SeqCst);
    let s = a.stop_system(&probe.weak());
    probe.busy.store(false, SeqCst);
    s
}

fn pattern(len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(29) ^ salt ^ (i >> 8) as u8)
        .collect()
}

fn finish(r: &Rig, regs: MapRegisters, b: &SimBuffer, length: u64, direction: Direction) {
    r.adapter.flush(&regs, b, 0, length, direction).unwrap();
    r.adapter.free(regs);
}

// ---------------------------------------------------------------------------------------------
// Adapters

#[test]
fn system_adapters_need_a_known_channel_and_line() {
    let r = rig(SystemCompletion::Manual);
    let mut d = desc(DmaWidth::Bits8);
    d.system.as_mut().unwrap().request_line = 0xBAD;
    assert_eq!(r.sim.adapter(&d).unwrap_err(), Error::InvalidParameter);
    d.system.as_mut().unwrap().request_line = 30;
    assert_eq!(
        r.sim.adapter(&d).unwrap_err(),
        Error::InvalidParameter,
        "line 30 reaches channel 6, not 5"
    );
    d.system.as_mut().unwrap().channel = 6;
    assert!(r.sim.adapter(&d).is_ok());
    // A second request line of channel 5 names the same channel.
    let mut other_line = desc(DmaWidth::Bits8);
    other_line.system.as_mut().unwrap().request_line = LINE + 1;
    assert!(r.sim.adapter(&other_line).is_ok());

    let mut master = desc(DmaWidth::Bits8);
    master.bus_master = true;
    assert_eq!(r.sim.adapter(&master).unwrap_err(), Error::InvalidParameter);
    let mut looped = desc(DmaWidth::Bits8);
    looped.system.as_mut().unwrap().looped_transfer = true;
    assert_eq!(
        r.sim.adapter(&looped).unwrap_err(),
        Error::InvalidDeviceRequest
    );
    // The system adapter maps directly with the controller's register count.
    assert_eq!(r.adapter.map_register_count(), N);
    assert_eq!(r.adapter.config().mode, AdapterMode::Direct);

    let plain = SimPlatform::new();
    assert_eq!(
        plain.adapter(&desc(DmaWidth::Bits8)).unwrap_err(),
        Error::InvalidDeviceRequest,
        "no controller"
    );
    assert_eq!(
        plain.add_fifo(FIFO_AT, 16).unwrap_err(),
        Error::InvalidDeviceRequest
    );
    assert_eq!(
        r.sim.add_system_dma(&SystemDmaConfig::new()).unwrap_err(),
        Error::InvalidDeviceState
    );
    assert_eq!(
        r.sim.add_fifo(FIFO_AT, 1).unwrap_err(),
        Error::InvalidParameter
    );
    assert_eq!(r.dma.fifo(FIFO_AT).unwrap().address(), FIFO_AT);
    r.sim.check_clean().unwrap();
}

#[test]
fn bus_master_adapters_have_no_system_operations() {
    let sim = SimConfig::new()
        .system_dma(SystemDmaConfig::new().channel(CH, LINE))
        .build()
        .unwrap();
    let a = sim.adapter(&SimPlatform::description(64)).unwrap();
    let b = sim.allocate_buffer(64, 0).unwrap();
    let p = Probe::new();
    let regs = match a.allocate(req(1, true), &p.weak()) {
        Ok(Allocation::Granted(r)) => r,
        other => panic!("{other:?}"),
    };
    let mut sg = [SgElement::default(); 1];
    let e = a
        .map_system(
            &regs,
            &b,
            0,
            64,
            Direction::WriteToDevice,
            0,
            &p.weak(),
            &mut sg,
        )
        .unwrap_err();
    assert_eq!(e, Error::InvalidDeviceRequest);
    assert_eq!(a.stop_system(&p.weak()), SystemStop::NotRunning);
    a.free(regs);
    sim.check_clean().unwrap();
}

#[test]
fn the_channel_has_one_owner_and_a_fifo_queue_across_adapters() {
    let r = rig(SystemCompletion::Manual);
    let second = r.sim.adapter(&desc(DmaWidth::Bits8)).unwrap();
    let (p1, p2, p3, p4) = (Probe::new(), Probe::new(), Probe::new(), Probe::new());
    for _ in 0..4 {
        r.adapter.register_waiter().unwrap();
    }
    let regs = grant(&r.adapter, &p1);
    assert!(r.dma.channel_owned(CH));
    // One register would fit, but the channel is taken: an immediate request fails ...
    assert_eq!(
        second.allocate(req(1, true), &p2.weak()).unwrap_err(),
        Error::InsufficientResources
    );
    // ... and others queue, in order, whichever adapter they come through.
    assert!(matches!(
        second.allocate(req(1, false), &p2.weak()),
        Ok(Allocation::Queued)
    ));
    assert!(matches!(
        r.adapter.allocate(req(N, false), &p3.weak()),
        Ok(Allocation::Queued)
    ));
    assert!(matches!(
        second.allocate(req(2, false), &p4.weak()),
        Ok(Allocation::Queued)
    ));
    assert_eq!(r.dma.channel_stats(CH).unwrap().queued, 3);
    assert_eq!((r.adapter.queued(), second.queued()), (1, 2));
    // A withdrawn request is never granted.
    assert!(second.cancel_allocation(&p4.weak()));
    assert!(!second.cancel_allocation(&p4.weak()));

    r.adapter.free(regs);
    let regs2 = p2.take_grant().expect("p2 is next");
    assert_eq!(regs2.count(), 1);
    assert!(p3.grants.lock().unwrap().is_empty());
    second.free(regs2);
    let regs3 = p3.take_grant().expect("p3 follows");
    assert_eq!(regs3.count(), N);
    assert!(r.dma.channel_owned(CH));
    r.adapter.free(regs3);
    assert!(p4.grants.lock().unwrap().is_empty());
    assert!(!r.dma.channel_owned(CH));
    let s = r.dma.channel_stats(CH).unwrap();
    assert_eq!((s.grants, s.queued, s.owned), (3, 0, false));
    assert_eq!(r.adapter.stats().cancels + second.stats().cancels, 1);
    // Another channel is independent.
    let mut d6 = desc(DmaWidth::Bits8);
    d6.system.as_mut().unwrap().channel = 6;
    d6.system.as_mut().unwrap().request_line = 30;
    let other = r.sim.adapter(&d6).unwrap();
    let regs = grant(&r.adapter, &p1);
    let regs6 = grant(&other, &p2);
    other.free(regs6);
    r.adapter.free(regs);
    for _ in 0..4 {
        r.adapter.unregister_waiter();
    }
    r.sim.check_clean().unwrap();
}

#[test]
fn dispatch_queued_grants_after_a_restore() {
    let r = rig(SystemCompletion::Manual);
    let p = Probe::new();
    r.adapter.exhaust(N);
    assert!(matches!(
        r.adapter.allocate(req(N, false), &p.weak()),
        Ok(Allocation::Queued)
    ));
    assert!(!r.dma.channel_owned(CH));
    r.adapter.restore();
    let regs = p.take_grant().expect("granted by restore");
    r.adapter.free(regs);
    r.sim.check_clean().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Data paths

#[test]
fn x3_two_pages_of_0xda_land_in_the_fifo() {
    let r = rig(SystemCompletion::Manual);
    let p = Probe::new();
    let mut b = r.sim.allocate_buffer(8192, 0).unwrap();
    b.write(0, &[0xDA; 8192]).unwrap();
    let regs = grant(&r.adapter, &p);
    let m = map_system(
        &r.adapter,
        &regs,
        &b,
        0,
        8192,
        Direction::WriteToDevice,
        0,
        &p,
    );
    assert_eq!(m.bytes, 8192);
    assert!(p.done().is_empty(), "data moves when the controller runs");
    assert_eq!(r.fifo.received_len(), 0);
    assert_eq!(r.dma.pending(), 1);
    assert!(r.dma.step());
    assert_eq!(p.done(), [SystemDmaStatus::Complete]);
    assert!(!p.called_while_busy.load(SeqCst));
    assert_eq!(r.fifo.take_received(), vec![0xDA; 8192]);
    finish(&r, regs, &b, 8192, Direction::WriteToDevice);
    let s = r.dma.channel_stats(CH).unwrap();
    assert_eq!(
        (s.started, s.completed, s.errors, s.cancelled, s.bytes_moved),
        (1, 1, 0, 0, 8192)
    );
    assert_eq!(r.adapter.stats().device_bytes_read, 8192);
    r.sim.check_clean().unwrap();
}

#[test]
fn device_offset_selects_the_endpoint_and_a_missing_one_is_an_error() {
    let r = rig(SystemCompletion::Manual);
    let reg2 = r.sim.add_fifo(FIFO_AT + 0x10, 64).unwrap();
    let p = Probe::new();
    let mut b = r.sim.allocate_buffer(32, 0).unwrap();
    b.write(0, &pattern(32, 1)).unwrap();
    let regs = grant(&r.adapter, &p);
    map_system(
        &r.adapter,
        &regs,
        &b,
        0,
        32,
        Direction::WriteToDevice,
        0x10,
        &p,
    );
    r.dma.run_pending();
    assert_eq!(reg2.take_received(), pattern(32, 1));
    assert_eq!(r.fifo.received_len(), 0);
    r.adapter
        .flush(&regs, &b, 0, 32, Direction::WriteToDevice)
        .unwrap();
    map_system(
        &r.adapter,
        &regs,
        &b,
        0,
        32,
        Direction::WriteToDevice,
        0x20,
        &p,
    );
    r.dma.run_pending();
    assert_eq!(
        p.done(),
        [
            SystemDmaStatus::Complete,
            SystemDmaStatus::Error { moved: 0 }
        ]
    );
    finish(&r, regs, &b, 32, Direction::WriteToDevice);
    assert_eq!(r.dma.channel_stats(CH).unwrap().errors, 1);
    r.sim.check_clean().unwrap();
}

#[test]
fn a_read_takes_the_fifo_source_into_memory() {
    let r = rig(SystemCompletion::Manual);
    let p = Probe::new();
    let data = pattern(6000, 7);
    r.fifo.push_source(&data);
    r.fifo.push_source(&[1, 2, 3]);
    let b = r.sim.allocate_buffer(6000, 0x123).unwrap();
    let regs = grant(&r.adapter, &p);
    let m = map_system(
        &r.adapter,
        &regs,
        &b,
        0,
        6000,
        Direction::ReadFromDevice,
        0,
        &p,
    );
    assert_eq!(m.bytes, 6000);
    assert!(r.dma.step());
    assert_eq!(p.done(), [SystemDmaStatus::Complete]);
    finish(&r, regs, &b, 6000, Direction::ReadFromDevice);
    let mut got = vec![0; 6000];
    b.read(0, &mut got).unwrap();
    assert_eq!(got, data);
    assert_eq!(r.fifo.source_len(), 3);
    assert_eq!(r.adapter.stats().device_bytes_written, 6000);
    r.sim.check_clean().unwrap();
}

#[test]
fn a_short_source_or_a_full_fifo_moves_what_it_can() {
    let r = rig(SystemCompletion::Manual);
    let small = r.sim.add_fifo(FIFO_AT + 0x100, 100).unwrap();
    let p = Probe::new();
    let mut b = r.sim.allocate_buffer(200, 0).unwrap();
    b.write(0, &pattern(200, 3)).unwrap();
    let regs = grant(&r.adapter, &p);
    // 200 bytes into a FIFO that holds 100.
    map_system(
        &r.adapter,
        &regs,
        &b,
        0,
        200,
        Direction::WriteToDevice,
        0x100,
        &p,
    );
    r.dma.step();
    assert_eq!(small.take_received(), pattern(100, 3));
    r.adapter
        .flush(&regs, &b, 0, 200, Direction::WriteToDevice)
        .unwrap();
    // 200 bytes from a source that has 50.
    b.write(0, &[0xEE; 200]).unwrap();
    r.fifo.push_source(&[0x55; 50]);
    map_system(
        &r.adapter,
        &regs,
        &b,
        0,
        200,
        Direction::ReadFromDevice,
        0,
        &p,
    );
    r.dma.step();
    assert_eq!(
        p.done(),
        [
            SystemDmaStatus::Error { moved: 100 },
            SystemDmaStatus::Error { moved: 50 }
        ]
    );
    finish(&r, regs, &b, 200, Direction::ReadFromDevice);
    let mut got = [0u8; 200];
    b.read(0, &mut got).unwrap();
    assert_eq!(&got[..50], &[0x55; 50]);
    assert_eq!(&got[50..], &[0xEE; 150], "the rest is not moved");
    assert_eq!(r.fifo.source_len(), 0);
    assert_eq!(r.dma.channel_stats(CH).unwrap().bytes_moved, 150);
    r.sim.check_clean().unwrap();
}

#[test]
fn a_length_that_is_not_whole_units_moves_the_whole_units_and_fails() {
    let r = rig_with(SystemCompletion::Manual, DmaWidth::Bits32);
    let p = Probe::new();
    let mut b = r.sim.allocate_buffer(4098, 0).unwrap();
    b.write(0, &pattern(4098, 9)).unwrap();
    let regs = grant(&r.adapter, &p);
    map_system(
        &r.adapter,
        &regs,
        &b,
        0,
        4098,
        Direction::WriteToDevice,
        0,
        &p,
    );
    r.dma.step();
    assert_eq!(p.done(), [SystemDmaStatus::Error { moved: 4096 }]);
    assert_eq!(r.fifo.take_received(), pattern(4096, 9));
    r.adapter
        .flush(&regs, &b, 0, 4098, Direction::WriteToDevice)
        .unwrap();
    map_system(
        &r.adapter,
        &regs,
        &b,
        0,
        4096,
        Direction::WriteToDevice,
        0,
        &p,
    );
    r.dma.step();
    assert_eq!(p.done()[1], SystemDmaStatus::Complete);
    finish(&r, regs, &b, 4096, Direction::WriteToDevice);
    r.sim.check_clean().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Completion modes

#[test]
fn deferred_transfers_complete_when_virtual_time_passes() {
    let r = rig(SystemCompletion::Deferred { latency_ns: 1_000 });
    let p = Probe::new();
    let b = r.sim.allocate_buffer(512, 0).unwrap();
    let regs = grant(&r.adapter, &p);
    map_system(
        &r.adapter,
        &regs,
        &b,
        0,
        512,
        Direction::WriteToDevice,
        0,
        &p,
    );
    assert_eq!(r.dma.advance(999), 0);
    assert!(p.done().is_empty());
    assert_eq!(r.dma.advance(1), 1);
    assert_eq!(p.done(), [SystemDmaStatus::Complete]);
    assert_eq!(r.dma.now_ns(), 1_000);
    r.adapter
        .flush(&regs, &b, 0, 512, Direction::WriteToDevice)
        .unwrap();
    // `step` completes a deferred transfer before its time.
    map_system(
        &r.adapter,
        &regs,
        &b,
        0,
        512,
        Direction::WriteToDevice,
        0,
        &p,
    );
    assert!(r.dma.step());
    assert!(!r.dma.step());
    assert_eq!(p.done().len(), 2);
    finish(&r, regs, &b, 512, Direction::WriteToDevice);
    assert_eq!(r.fifo.take_received().len(), 1024);
    r.sim.check_clean().unwrap();
}

#[test]
fn manual_transfers_wait_for_a_step() {
    let r = rig(SystemCompletion::Manual);
    let p = Probe::new();
    let b = r.sim.allocate_buffer(64, 0).unwrap();
    let regs = grant(&r.adapter, &p);
    map_system(
        &r.adapter,
        &regs,
        &b,
        0,
        64,
        Direction::WriteToDevice,
        0,
        &p,
    );
    assert_eq!(r.dma.advance(u64::MAX / 2), 0);
    assert!(p.done().is_empty());
    assert_eq!(r.dma.run_pending(), 1);
    assert_eq!(r.dma.run_pending(), 0);
    assert_eq!(p.done(), [SystemDmaStatus::Complete]);
    finish(&r, regs, &b, 64, Direction::WriteToDevice);
    r.dma.set_mode(SystemCompletion::Deferred { latency_ns: 0 });
    let regs = grant(&r.adapter, &p);
    map_system(
        &r.adapter,
        &regs,
        &b,
        0,
        64,
        Direction::WriteToDevice,
        0,
        &p,
    );
    assert!(
        p.done().len() == 1,
        "even a zero latency waits for a stepping call"
    );
    assert_eq!(r.dma.advance(0), 1);
    finish(&r, regs, &b, 64, Direction::WriteToDevice);
    assert!(!p.called_while_busy.load(SeqCst));
    r.sim.check_clean().unwrap();
}

#[test]
fn a_waiter_may_flush_free_and_start_again_from_its_completion() {
    let r = rig(SystemCompletion::Deferred { latency_ns: 0 });
    let p = Probe::new();
    let next = Probe::new();
    let b = Arc::new(r.sim.allocate_buffer(256, 0).unwrap());
    let regs = grant(&r.adapter, &p);
    assert!(matches!(
        r.adapter.allocate(req(N, false), &next.weak()),
        Ok(Allocation::Queued)
    ));
    map_system(
        &r.adapter,
        &regs,
        &b,
        0,
        256,
        Direction::WriteToDevice,
        0,
        &p,
    );
    // The completion flushes and frees (as the core's release does): the channel goes to
    // `next` on this thread, whose grant starts its own transfer.
    let slot = Arc::new(Mutex::new(Some(regs)));
    {
        let (a, b, slot, next) = (r.adapter.clone(), b.clone(), slot.clone(), next.clone());
        *p.on_done.lock().unwrap() = Some(Box::new(move || {
            let regs = slot.lock().unwrap().take().unwrap();
            a.flush(&regs, &*b, 0, 256, Direction::WriteToDevice)
                .unwrap();
            a.free(regs);
            let regs = next.take_grant().expect("granted inside free");
            let mut sg = [SgElement::default(); 4];
            a.map_system(
                &regs,
                &*b,
                0,
                256,
                Direction::WriteToDevice,
                0,
                &next.weak(),
                &mut sg,
            )
            .unwrap();
            *slot.lock().unwrap() = Some(regs);
        }));
    }
    // Both complete within one advance: the second was due when it started.
    assert_eq!(r.dma.advance(0), 2);
    assert_eq!(next.done(), [SystemDmaStatus::Complete]);
    let regs = slot.lock().unwrap().take().unwrap();
    finish(&r, regs, &b, 256, Direction::WriteToDevice);
    assert_eq!(r.fifo.take_received().len(), 512);
    r.sim.check_clean().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Stop and faults

#[test]
fn a_stopped_transfer_moves_nothing_and_reports_cancelled_later() {
    // Zero latency: a backend that called waiters from inside its calls would show it here.
    let r = rig(SystemCompletion::Deferred { latency_ns: 0 });
    let p = Probe::new();
    let other = Probe::new();
    let mut b = r.sim.allocate_buffer(8192, 0).unwrap();
    b.write(0, &[0xDA; 8192]).unwrap();
    let regs = grant(&r.adapter, &p);
    assert_eq!(
        stop(&r.adapter, &p),
        SystemStop::NotRunning,
        "nothing mapped"
    );
    map_system(
        &r.adapter,
        &regs,
        &b,
        0,
        8192,
        Direction::WriteToDevice,
        0,
        &p,
    );
    assert_eq!(r.adapter.stop_system(&other.weak()), SystemStop::NotRunning);
    assert_eq!(stop(&r.adapter, &p), SystemStop::Stopped);
    assert_eq!(stop(&r.adapter, &p), SystemStop::AlreadyStopped);
    assert!(p.done().is_empty());
    assert_eq!(r.dma.advance(0), 1);
    assert_eq!(p.done(), [SystemDmaStatus::Cancelled { moved: 0 }]);
    assert_eq!(stop(&r.adapter, &p), SystemStop::NotRunning, "delivered");
    assert_eq!(
        r.fifo.received_len(),
        0,
        "the remaining bytes are not moved"
    );
    assert!(!p.called_while_busy.load(SeqCst));
    finish(&r, regs, &b, 8192, Direction::WriteToDevice);
    let s = r.dma.channel_stats(CH).unwrap();
    assert_eq!((s.completed, s.cancelled, s.bytes_moved), (1, 1, 0));
    r.sim.check_clean().unwrap();
}

#[test]
fn a_deferred_stop_moves_the_share_it_had_reached() {
    // 1000 ns latency: stopped after 375 ns, 3/8 of 8192 bytes moved; after 333 ns with a
    // 32-bit channel, 2727 bytes rounded down to whole units.
    for (width, stop_at, moved) in [
        (DmaWidth::Bits8, 375, 3072),
        (DmaWidth::Bits32, 333, 2724),
        (DmaWidth::Bits8, 999, 8183),
    ] {
        let r = rig_with(SystemCompletion::Deferred { latency_ns: 1000 }, width);
        let p = Probe::new();
        let data = pattern(8192, 7);
        let mut b = r.sim.allocate_buffer(8192, 0).unwrap();
        b.write(0, &data).unwrap();
        let regs = grant(&r.adapter, &p);
        map_system(
            &r.adapter,
            &regs,
            &b,
            0,
            8192,
            Direction::WriteToDevice,
            0,
            &p,
        );
        assert_eq!(r.dma.advance(stop_at), 0, "not due yet");
        assert_eq!(stop(&r.adapter, &p), SystemStop::Stopped);
        assert!(r.dma.step());
        assert_eq!(
            p.done(),
            [SystemDmaStatus::Cancelled { moved }],
            "{width:?}"
        );
        assert_eq!(
            r.fifo.take_received(),
            data[..moved as usize],
            "the bytes reached, no more"
        );
        finish(&r, regs, &b, 8192, Direction::WriteToDevice);
        let s = r.dma.channel_stats(CH).unwrap();
        assert_eq!((s.cancelled, s.bytes_moved), (1, moved));
        r.sim.check_clean().unwrap();
    }
}

#[test]
fn a_stop_after_an_error_point_reports_the_error_and_one_before_it_does_not() {
    // ErrorAt(100), stopped at half of 8192: the transfer had already failed.
    let r = rig(SystemCompletion::Deferred { latency_ns: 1000 });
    let p = Probe::new();
    let b = r.sim.allocate_buffer(8192, 0).unwrap();
    r.dma.inject(CH, 0, SystemFault::ErrorAt(100)).unwrap();
    let regs = grant(&r.adapter, &p);
    map_system(
        &r.adapter,
        &regs,
        &b,
        0,
        8192,
        Direction::WriteToDevice,
        0,
        &p,
    );
    assert_eq!(r.dma.advance(500), 0);
    assert_eq!(stop(&r.adapter, &p), SystemStop::Stopped);
    assert_eq!(r.dma.advance(0), 1);
    assert_eq!(p.done(), [SystemDmaStatus::Error { moved: 100 }]);
    assert_eq!(r.fifo.take_received().len(), 100);
    r.adapter
        .flush(&regs, &b, 0, 8192, Direction::WriteToDevice)
        .unwrap();
    // An error point beyond the stop point does not bite.
    r.dma.inject(CH, 1, SystemFault::ErrorAt(6000)).unwrap();
    map_system(
        &r.adapter,
        &regs,
        &b,
        0,
        8192,
        Direction::WriteToDevice,
        0,
        &p,
    );
    assert_eq!(r.dma.advance(500), 0);
    assert_eq!(stop(&r.adapter, &p), SystemStop::Stopped);
    assert_eq!(r.dma.advance(0), 1);
    assert_eq!(p.done()[1], SystemDmaStatus::Cancelled { moved: 4096 });
    assert_eq!(r.fifo.take_received().len(), 4096);
    finish(&r, regs, &b, 8192, Direction::WriteToDevice);
    r.sim.check_clean().unwrap();
}

#[test]
fn a_stop_of_a_transfer_that_is_due_but_undelivered_finds_nothing_running() {
    // Two channels due at the same time: while the first one's completion is delivered, the
    // second has finished in virtual time but is not delivered yet. Stopping it then is too
    // late: NotRunning, and it completes normally.
    let r = rig(SystemCompletion::Deferred { latency_ns: 1000 });
    let mut d6 = desc(DmaWidth::Bits8);
    d6.system.as_mut().unwrap().channel = 6;
    d6.system.as_mut().unwrap().request_line = 30;
    let other = r.sim.adapter(&d6).unwrap();
    let (p5, p6) = (Probe::new(), Probe::new());
    let b5 = r.sim.allocate_buffer(64, 0).unwrap();
    let b6 = r.sim.allocate_buffer(64, 0).unwrap();
    let g5 = grant(&r.adapter, &p5);
    let g6 = grant(&other, &p6);
    map_system(
        &r.adapter,
        &g5,
        &b5,
        0,
        64,
        Direction::WriteToDevice,
        0,
        &p5,
    );
    map_system(&other, &g6, &b6, 0, 64, Direction::WriteToDevice, 0, &p6);
    let seen = Arc::new(Mutex::new(None));
    let (o, w, s) = (other.clone(), p6.weak(), Arc::clone(&seen));
    *p5.on_done.lock().unwrap() = Some(Box::new(move || {
        *s.lock().unwrap() = Some(o.stop_system(&w));
    }));
    assert_eq!(r.dma.advance(1000), 2);
    assert_eq!(*seen.lock().unwrap(), Some(SystemStop::NotRunning));
    assert_eq!(p6.done(), [SystemDmaStatus::Complete]);
    assert_eq!(r.fifo.take_received().len(), 128);
    finish(&r, g5, &b5, 64, Direction::WriteToDevice);
    other
        .flush(&g6, &b6, 0, 64, Direction::WriteToDevice)
        .unwrap();
    other.free(g6);
    drop(other);
    r.sim.check_clean().unwrap();
}

#[test]
fn a_manual_stop_is_delivered_by_advance_too() {
    let r = rig(SystemCompletion::Manual);
    let p = Probe::new();
    let b = r.sim.allocate_buffer(64, 0).unwrap();
    let regs = grant(&r.adapter, &p);
    map_system(
        &r.adapter,
        &regs,
        &b,
        0,
        64,
        Direction::WriteToDevice,
        0,
        &p,
    );
    assert_eq!(stop(&r.adapter, &p), SystemStop::Stopped);
    assert_eq!(r.dma.advance(0), 1);
    assert_eq!(p.done(), [SystemDmaStatus::Cancelled { moved: 0 }]);
    finish(&r, regs, &b, 64, Direction::WriteToDevice);
    r.sim.check_clean().unwrap();
}

#[test]
fn error_at_byte_n_and_stall_follow_the_plan() {
    let r = rig(SystemCompletion::Manual);
    r.dma.inject(CH, 0, SystemFault::ErrorAt(100)).unwrap();
    r.dma.inject(CH, 2, SystemFault::Stall).unwrap();
    r.dma.inject(CH, 3, SystemFault::Stall).unwrap();
    assert_eq!(
        r.dma.inject(99, 0, SystemFault::Stall).unwrap_err(),
        Error::InvalidParameter
    );
    let p = Probe::new();
    let mut b = r.sim.allocate_buffer(8192, 0).unwrap();
    b.write(0, &pattern(8192, 5)).unwrap();
    let regs = grant(&r.adapter, &p);
    let run = |expect: usize| {
        map_system(
            &r.adapter,
            &regs,
            &b,
            0,
            8192,
            Direction::WriteToDevice,
            0,
            &p,
        );
        assert_eq!(r.dma.run_pending(), expect);
    };
    let flush = || {
        r.adapter
            .flush(&regs, &b, 0, 8192, Direction::WriteToDevice)
            .unwrap()
    };
    // Transfer 0: error after 100 bytes.
    run(1);
    assert_eq!(r.fifo.take_received(), pattern(100, 5));
    flush();
    // Transfer 1: no fault.
    run(1);
    assert_eq!(r.fifo.take_received(), pattern(8192, 5));
    flush();
    // Transfer 2 stalls until stopped.
    run(0);
    assert_eq!(r.dma.pending(), 1);
    assert!(!r.dma.step());
    assert_eq!(r.dma.advance(1_000_000), 0);
    assert_eq!(stop(&r.adapter, &p), SystemStop::Stopped);
    assert!(r.dma.step());
    flush();
    // Transfer 3 stalls until released, then completes.
    run(0);
    assert_eq!(r.dma.release_stalled(), 1);
    assert_eq!(r.fifo.take_received(), pattern(8192, 5));
    flush();
    assert_eq!(
        p.done(),
        [
            SystemDmaStatus::Error { moved: 100 },
            SystemDmaStatus::Complete,
            SystemDmaStatus::Cancelled { moved: 0 },
            SystemDmaStatus::Complete,
        ]
    );
    r.adapter.free(regs);
    let s = r.dma.channel_stats(CH).unwrap();
    assert_eq!(
        (s.started, s.completed, s.errors, s.cancelled, s.bytes_moved),
        (4, 4, 1, 1, 100 + 2 * 8192)
    );
    r.dma.clear_faults();
    r.sim.check_clean().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Misuse and the end-of-test check

#[test]
fn check_clean_sees_a_running_transfer_and_an_owned_channel() {
    let r = rig(SystemCompletion::Manual);
    let p = Probe::new();
    let b = r.sim.allocate_buffer(64, 0).unwrap();
    let regs = grant(&r.adapter, &p);
    let e = r.sim.check_clean().unwrap_err();
    assert!(e.contains("channel 5: owned"), "{e}");
    map_system(
        &r.adapter,
        &regs,
        &b,
        0,
        64,
        Direction::WriteToDevice,
        0,
        &p,
    );
    let e = r.sim.check_clean().unwrap_err();
    assert!(e.contains("transfer 0 (64 bytes) running"), "{e}");
    // A second transfer while one runs is refused.
    let mut sg = [SgElement::default(); 2];
    let twice = r
        .adapter
        .map_system(
            &regs,
            &b,
            0,
            64,
            Direction::WriteToDevice,
            0,
            &p.weak(),
            &mut sg,
        )
        .unwrap_err();
    assert_eq!(twice, Error::InvalidDeviceState);
    r.dma.step();
    let e = r.sim.check_clean().unwrap_err();
    assert!(!e.contains("running"), "{e}");
    finish(&r, regs, &b, 64, Direction::WriteToDevice);
    r.sim.check_clean().unwrap();
}

#[test]
fn freeing_a_running_transfer_stops_it_and_is_recorded() {
    let r = rig(SystemCompletion::Manual);
    let p = Probe::new();
    let mut b = r.sim.allocate_buffer(4096, 0).unwrap();
    b.write(0, &[0xDA; 4096]).unwrap();
    let regs = grant(&r.adapter, &p);
    map_system(
        &r.adapter,
        &regs,
        &b,
        0,
        4096,
        Direction::WriteToDevice,
        0,
        &p,
    );
    p.busy.store(true, SeqCst);
    r.adapter.free(regs);
    p.busy.store(false, SeqCst);
    assert!(!r.dma.channel_owned(CH));
    assert_eq!(r.dma.pending(), 1);
    let e = r.sim.check_clean().unwrap_err();
    assert!(
        e.contains("registers freed while transfer 0 was running"),
        "{e}"
    );
    assert!(e.contains("detached"), "{e}");
    assert!(r.dma.step());
    assert_eq!(p.done(), [SystemDmaStatus::Cancelled { moved: 0 }]);
    assert!(!p.called_while_busy.load(SeqCst));
    assert_eq!(r.fifo.received_len(), 0);
    assert!(
        r.sim.sanitizer_record().is_empty(),
        "no access to freed memory"
    );
    let e = r.sim.check_clean().unwrap_err();
    assert_eq!(e.lines().count(), 1, "{e}");
}

#[test]
fn a_transfer_flushed_before_it_completes_is_blocked_by_the_sanitizer() {
    let r = rig(SystemCompletion::Manual);
    let p = Probe::new();
    let b = r.sim.allocate_buffer(64, 0).unwrap();
    let regs = grant(&r.adapter, &p);
    map_system(
        &r.adapter,
        &regs,
        &b,
        0,
        64,
        Direction::WriteToDevice,
        0,
        &p,
    );
    r.adapter
        .flush(&regs, &b, 0, 64, Direction::WriteToDevice)
        .unwrap();
    r.dma.step();
    assert_eq!(p.done(), [SystemDmaStatus::Error { moved: 0 }]);
    assert_eq!(r.sim.sanitizer_record().len(), 1);
    r.sim.clear_sanitizer();
    r.adapter.free(regs);
    r.sim.check_clean().unwrap();
}
