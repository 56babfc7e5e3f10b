//! The driver's handling of bad input and of paths the scenarios do not take.

use std::sync::Arc;
use std::time::Duration;

use dmatx::{DmaDevice, Error};
use dmatx_plx::driver::{
    IOCTL_PLX9X5X_TOGGLE_SINGLE_TRANSFER, PlxConfig, Resource, plx_evt_device_add,
};
use dmatx_plx::sim::{BoardConfig, SimBoard, SimPlx};
use dmatx_runtime::{IoctlCode, TransferMethod};
use dmatx_sim::{Plx9656Config, Plx9656Fault, Plx9656Outcome, SimBuffer, SimPlatform, SimPlx9656};

const WAIT: Duration = Duration::from_secs(20);

/// A driver added on a fresh machine with a chip, not prepared.
fn unprepared() -> (SimPlatform, SimPlx, SimPlx9656) {
    let sim = SimPlatform::new();
    let plx: SimPlx = plx_evt_device_add(
        DmaDevice::new(sim.clone()),
        Arc::new(|_| {}),
        PlxConfig::default(),
    )
    .unwrap();
    let e = plx.enabler();
    let chip = SimPlx9656::duplex(
        e.adapter(dmatx::Direction::ReadFromDevice).unwrap(),
        e.adapter(dmatx::Direction::WriteToDevice).unwrap(),
        Plx9656Config::default(),
    );
    (sim, plx, chip)
}

#[test]
fn prepare_hardware_needs_both_bars_by_size() {
    let (sim, plx, chip) = unprepared();
    // BAR2 missing: a configuration error, and the device cannot start.
    assert_eq!(
        plx.prepare_hardware(vec![
            Resource::Memory(Arc::new(chip.bar0())),
            Resource::Port { length: 0x100 },
        ]),
        Err(Error::InvalidDeviceState)
    );
    assert_eq!(plx.start(), Err(Error::InvalidDeviceState));
    // BAR0 missing.
    assert_eq!(
        plx.prepare_hardware(vec![Resource::Memory(Arc::new(chip.bar2()))]),
        Err(Error::InvalidDeviceState)
    );
    // Both, in any order, among other resources: found by size.
    plx.prepare_hardware(vec![
        Resource::Interrupt,
        Resource::Memory(Arc::new(chip.bar2())),
        Resource::Port { length: 0x100 },
        Resource::Memory(Arc::new(chip.bar0())),
    ])
    .unwrap();
    // Preparing twice is refused.
    assert_eq!(
        plx.prepare_hardware(vec![
            Resource::Memory(Arc::new(chip.bar0())),
            Resource::Memory(Arc::new(chip.bar2())),
        ]),
        Err(Error::InvalidDeviceState)
    );
    plx.start().unwrap();
    plx.remove().unwrap();
    chip.check_idle().unwrap();
    assert_eq!(chip.stats().soft_resets, 1, "removal resets the chip");
    sim.check_clean().unwrap();
}

fn board() -> SimBoard {
    SimBoard::new(BoardConfig::default()).unwrap()
}

#[test]
fn ioctl_errors_are_reported() {
    let b = board();
    let unknown = IoctlCode::new(0x22, 0x1, TransferMethod::Buffered, 0);
    let out = b.sim().allocate_buffer(1, 0).unwrap();
    let h = b.plx().device_control(unknown, None, Some(out)).unwrap();
    assert_eq!(
        h.wait_timeout(WAIT).unwrap().status,
        Err(Error::InvalidDeviceRequest)
    );
    // The toggle without an output buffer: too small, and nothing toggled.
    let h = b
        .plx()
        .device_control(IOCTL_PLX9X5X_TOGGLE_SINGLE_TRANSFER, None, None)
        .unwrap();
    assert_eq!(
        h.wait_timeout(WAIT).unwrap().status,
        Err(Error::BufferTooSmall)
    );
    assert!(!b.plx().single_transfer());
    drop(h);
    b.shut_down().unwrap();
}

#[test]
fn a_read_larger_than_the_sram_is_refused() {
    let b = board();
    let h = b.read(131_073, 0).unwrap();
    let done = h.wait_timeout(WAIT).unwrap();
    assert_eq!(
        (done.status, done.information),
        (Err(Error::InvalidBufferSize), 0)
    );
    assert_eq!(b.plx().stats().program_read_calls, 0);
    let ok = b.read(131_072, 0).unwrap();
    assert_eq!(ok.wait_timeout(WAIT).unwrap().information, 131_072);
    drop((h, ok));
    b.shut_down().unwrap();
}

#[test]
fn hardened_read_abort_is_a_data_error_and_the_next_read_works() {
    let b = SimBoard::new(BoardConfig {
        driver: PlxConfig::hardened(Duration::from_secs(5)),
        ..BoardConfig::default()
    })
    .unwrap();
    b.chip().sram_write(0, &[0x5A; 8192]).unwrap();
    b.chip()
        .inject(1, 0, Plx9656Fault::DataAbort { at_byte: 4096 }, false);
    let h = b.read(8192, 0).unwrap();
    let done = h.wait_timeout(WAIT).unwrap();
    assert_eq!(b.chip().last_outcome(1), Some(Plx9656Outcome::DataAbort));
    // The first descriptor completed (cleared) before the abort: 4096 bytes moved.
    assert_eq!(
        (done.status, done.information),
        (Err(Error::DeviceDataError), 4096)
    );
    assert_eq!(b.plx().stats().aborts_detected, 1);
    let next = b.read(8192, 0).unwrap();
    let nd = next.wait_timeout(WAIT).unwrap();
    assert_eq!((nd.status, nd.information), (Ok(()), 8192));
    assert_eq!(
        next.output().map(SimBuffer::to_vec).unwrap(),
        vec![0x5A; 8192]
    );
    drop((h, next));
    b.shut_down().unwrap();
}

#[test]
fn the_faithful_port_loops_on_a_persistent_read_abort_until_the_fault_goes() {
    // samples.md §1.4: an aborted read reports only the cleared descriptors and the framework
    // re-issues the rest; with a persistent fault that never ends.
    let b = board();
    b.chip()
        .inject(1, 0, Plx9656Fault::DataAbort { at_byte: 0 }, true);
    let h = b.read(4096, 0).unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while b.plx().stats().program_read_calls < 10 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(b.plx().stats().program_read_calls >= 10);
    assert!(h.try_completed().is_none());
    b.chip().clear_faults();
    let done = h.wait_timeout(WAIT).unwrap();
    assert_eq!((done.status, done.information), (Ok(()), 4096));
    drop(h);
    b.shut_down().unwrap();
}
