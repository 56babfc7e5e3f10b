//! The edu driver's other behaviours on the simulated machine: v3 queuing, cancel, the QEMU
//! 7.2 erratum, the watchdog, the register functions, a wrong device, removal.

use std::sync::Arc;
use std::time::Duration;

use dmatx::{DmaDevice, Error};
use dmatx_edu::sim::{BoardConfig, SimEduBoard, SimEduDriver};
use dmatx_edu::{EduConfig, PrepareError, edu_device_add, hw};
use dmatx_runtime::{Completed, RequestHandle};
use dmatx_sim::{AdapterMode, SimBuffer, SimConfig, SimEdu, SimEduConfig, SimPlatform};

const WAIT: Duration = Duration::from_secs(10);

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
}

fn done(h: &RequestHandle<SimBuffer>) -> Completed {
    h.wait_timeout(WAIT).expect("the request completes")
}

fn output(h: &RequestHandle<SimBuffer>, n: usize) -> Vec<u8> {
    let mut out = vec![0; n];
    h.output().unwrap().read(0, &mut out).unwrap();
    out
}

fn held(config: BoardConfig) -> BoardConfig {
    BoardConfig {
        edu: SimEduConfig {
            hold: true,
            ..config.edu
        },
        ..config
    }
}

fn wait_for(mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + WAIT;
    while !f() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting");
        std::thread::sleep(Duration::from_micros(200));
    }
}

#[test]
fn v3_queuing_the_second_transaction_waits_for_map_registers() {
    let board = SimEduBoard::new(held(BoardConfig::default().one_transfer_of_registers())).unwrap();
    let adapter = board.sim().last_adapter().unwrap();
    assert_eq!(adapter.stats().total_registers, 2);
    let data = pattern(4096, 1);
    // One transfer spanning two pages: the first holds both registers. Its last (only)
    // transfer is programmed, so the second is admitted, executed, and waits in the adapter's
    // queue.
    let first = board.write(&data, 1).unwrap();
    let second = board.read(4096, 0).unwrap();
    wait_for(|| board.chip().dma_busy());
    let stats = adapter.stats();
    assert_eq!(stats.queued, 1, "{stats:?}");
    assert_eq!(board.edu().stats().transfers(), 1);
    board.chip().release();
    assert_eq!(done(&first).status, Ok(()));
    assert_eq!(done(&second).status, Ok(()));
    assert_eq!(output(&second, 4096), data);
    assert_eq!(adapter.stats().queued_total, 1);
    let s = board.edu().stats();
    assert_eq!((s.transfers_to_device, s.transfers_to_ram), (1, 1));
    drop((first, second));
    board.shut_down().unwrap();
}

#[test]
fn with_many_map_registers_the_second_transfer_waits_for_the_engine() {
    let board = SimEduBoard::new(held(BoardConfig::default())).unwrap();
    let data = pattern(4096, 2);
    let first = board.write(&data, 0).unwrap();
    let second = board.read(4096, 0).unwrap();
    wait_for(|| board.edu().stats().engine_waits == 1);
    assert_eq!(
        board.chip().stats().commands,
        1,
        "one transfer on the device"
    );
    board.chip().release();
    assert_eq!(done(&first).status, Ok(()));
    assert_eq!(done(&second).status, Ok(()));
    assert_eq!(output(&second, 4096), data);
    assert_eq!(board.chip().stats().ignored_writes, 0);
    drop((first, second));
    board.shut_down().unwrap();
}

#[test]
fn a_queued_request_cancelled_completes_cancelled_with_its_buffer_untouched() {
    let board = SimEduBoard::new(held(BoardConfig::default().one_transfer_of_registers())).unwrap();
    let adapter = board.sim().last_adapter().unwrap();
    let first = board.write(&pattern(4096, 3), 1).unwrap();
    let untouched = pattern(4096, 0x5A);
    let buffer = board.buffer_with(&untouched, 0).unwrap();
    let second = board.edu().read(buffer).unwrap();
    let third = board.loopback(&pattern(100, 4), 0, 0).unwrap();
    wait_for(|| adapter.stats().queued == 1);
    assert_eq!(second.cancel(), Ok(true));
    assert_eq!(
        done(&second),
        Completed {
            status: Err(Error::Cancelled),
            information: 0
        }
    );
    assert_eq!(output(&second, 4096), untouched);
    // Not yet admitted: cancelled from the driver's backlog.
    assert_eq!(third.cancel(), Ok(true));
    assert_eq!(done(&third).status, Err(Error::Cancelled));
    board.chip().release();
    assert_eq!(done(&first).status, Ok(()));
    let s = board.edu().stats();
    assert_eq!((s.cancelled, s.transfers()), (2, 1));
    assert!(
        adapter.stats().cancels >= 1,
        "the queued allocation was withdrawn"
    );
    drop((first, second, third));
    board.shut_down().unwrap();
}

fn erratum_board(max_transfer: u64) -> SimEduBoard {
    SimEduBoard::new(BoardConfig {
        edu: SimEduConfig {
            erratum_end_abort: true,
            ..SimEduConfig::default()
        },
        driver: EduConfig {
            max_transfer,
            timeout: Duration::from_millis(100),
            ..EduConfig::default()
        },
        ..BoardConfig::default()
    })
    .unwrap()
}

#[test]
fn erratum_a_4096_byte_transfer_is_refused_and_times_out_4095_is_fine() {
    let board = erratum_board(4096);
    let h = board.write(&pattern(4096, 5), 0).unwrap();
    assert_eq!(
        done(&h),
        Completed {
            status: Err(Error::IoTimeout),
            information: 0
        }
    );
    assert_eq!(board.chip().stats().refused, 1);
    assert_eq!(board.edu().stats().timeouts, 1);
    // The device is wedged (QEMU 7.2 would have aborted): reset it before shutting down.
    board.chip().reset();
    drop(h);
    board.shut_down().unwrap();

    let board = erratum_board(hw::ERRATUM_MAX_TRANSFER);
    let data = pattern(4096, 6);
    let h = board.loopback(&data, 0, 0).unwrap();
    assert_eq!(done(&h).status, Ok(()));
    assert_eq!(output(&h, 4096), data);
    assert_eq!(board.edu().stats().transfers(), 4, "4095 + 1, both ways");
    assert_eq!(board.chip().stats().refused, 0);
    drop(h);
    board.shut_down().unwrap();
}

#[test]
fn a_device_that_never_completes_fails_the_request_with_io_timeout() {
    for polled in [false, true] {
        let mut config = held(BoardConfig::default());
        config.driver.timeout = Duration::from_millis(50);
        if polled {
            config.driver.completion = dmatx_edu::Completion::Polled {
                interval: Duration::from_millis(1),
            };
        }
        let board = SimEduBoard::new(config).unwrap();
        let h = board.loopback(&pattern(9000, 7), 3, 0).unwrap();
        assert_eq!(
            done(&h),
            Completed {
                status: Err(Error::IoTimeout),
                information: 0
            }
        );
        wait_for(|| board.edu().requests_in_flight() == 0);
        // Nothing left behind: the transaction released its mapping and registers.
        let adapter = board.sim().last_adapter().unwrap();
        assert_eq!(adapter.stats().live_mappings, 0);
        assert_eq!(
            adapter.stats().free_registers,
            adapter.stats().total_registers
        );
        board.chip().reset();
        // The driver works again after the device's reset.
        board.chip().release();
        let again = board.loopback(&pattern(10, 8), 0, 0).unwrap();
        assert_eq!(done(&again).status, Ok(()));
        drop((h, again));
        board.shut_down().unwrap();
    }
}

#[test]
fn liveness_and_factorial() {
    let board = SimEduBoard::new(BoardConfig::default()).unwrap();
    for v in [0, 1, 0xDEAD_BEEF, u32::MAX] {
        assert_eq!(board.edu().liveness(v), Ok(!v));
    }
    assert_eq!(board.edu().factorial(0), Ok(1));
    assert_eq!(board.edu().factorial(5), Ok(120));
    assert_eq!(board.edu().factorial(12), Ok(479_001_600));
    assert_eq!(
        board.edu().factorial(13),
        Ok(1_932_053_504),
        "wraps as the device does"
    );
    assert_eq!(board.chip().stats().factorials, 4);
    board.shut_down().unwrap();
}

#[test]
fn register_functions_need_prepared_hardware() {
    let sim = SimPlatform::new();
    let edu: SimEduDriver =
        edu_device_add(DmaDevice::new(sim.clone()), EduConfig::default()).unwrap();
    assert_eq!(edu.liveness(1), Err(Error::InvalidDeviceState));
    assert_eq!(edu.factorial(1), Err(Error::InvalidDeviceState));
    assert_eq!(edu.start(), Err(Error::InvalidDeviceState));
    edu.remove().unwrap();
    sim.check_clean().unwrap();
}

#[test]
fn a_wrong_id_is_refused_and_nothing_is_left() {
    let sim = SimConfig::new().mode(AdapterMode::Iommu).build().unwrap();
    let edu: SimEduDriver =
        edu_device_add(DmaDevice::new(sim.clone()), EduConfig::default()).unwrap();
    let adapter = edu
        .enabler()
        .adapter(dmatx::Direction::ReadFromDevice)
        .unwrap()
        .clone();
    let chip = SimEdu::new(
        &adapter,
        SimEduConfig {
            id: 0x0100_00ee,
            ..SimEduConfig::default()
        },
    )
    .unwrap();
    let e = edu.prepare_hardware(Arc::new(chip.bar0())).unwrap_err();
    assert_eq!(e, PrepareError::WrongId { found: 0x0100_00ee });
    assert!(e.to_string().contains("not an edu device"), "{e}");
    assert_eq!(e.status(), Error::InvalidDeviceState);
    assert_eq!(edu.start(), Err(Error::InvalidDeviceState));
    edu.remove().unwrap();
    chip.shut_down();
    sim.check_clean().unwrap();

    // Through the board: a clear message.
    let err = SimEduBoard::new(BoardConfig {
        edu: SimEduConfig {
            id: 0,
            ..SimEduConfig::default()
        },
        ..BoardConfig::default()
    })
    .unwrap_err();
    assert!(err.contains("ID register reads 0x00000000"), "{err}");
}

#[test]
fn remove_with_requests_in_flight() {
    let mut config = BoardConfig::default().one_transfer_of_registers();
    config.edu.dma_delay = Duration::from_millis(20);
    let board = SimEduBoard::new(config).unwrap();
    let running = board.write(&pattern(8192, 9), 0).unwrap();
    let queued = board.read(4096, 0).unwrap();
    let backlog = board.loopback(&pattern(5000, 1), 0, 0).unwrap();
    wait_for(|| board.chip().dma_busy());
    board.edu().remove().unwrap();
    // The one on the device finished; the others never reached it.
    assert_eq!(done(&running).status, Ok(()));
    assert_eq!(done(&queued).status, Err(Error::Cancelled));
    assert_eq!(done(&backlog).status, Err(Error::Cancelled));
    assert_eq!(
        board.edu().write(board.buffer_with(&[1], 0).unwrap()).err(),
        Some(Error::InvalidDeviceState)
    );
    drop((running, queued, backlog));
    // shut_down removes again: only that second removal's error is expected.
    let err = board.shut_down().unwrap_err();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("remove:"), "{err}");
}

#[test]
fn a_loopback_with_a_short_output_is_refused() {
    let board = SimEduBoard::new(BoardConfig::default()).unwrap();
    let short_output = board
        .edu()
        .loopback(
            board.buffer_with(&[1; 100], 0).unwrap(),
            board.buffer_with(&[0; 10], 0).unwrap(),
        )
        .unwrap();
    assert_eq!(done(&short_output).status, Err(Error::BufferTooSmall));
    drop(short_output);
    board.shut_down().unwrap();
}

/// A DMA the watchdog gave up on keeps edu busy (it cannot be aborted): the request queued
/// behind it is not programmed into the busy engine (edu would ignore it and the request would
/// complete with no data moved); it waits until the device ends the DMA, then runs — or, if the
/// device never does, fails with IoTimeout itself.
#[test]
fn a_request_behind_a_timed_out_dma_waits_for_the_engine() {
    for device_recovers in [true, false] {
        let mut config = held(BoardConfig::default().one_transfer_of_registers());
        config.driver.timeout = Duration::from_millis(50);
        let board = SimEduBoard::new(config).unwrap();
        // What B must read back (A's late DMA is blocked, so it stays).
        let held_bytes = pattern(4096, 0x5a);
        board.chip().fill_device_buffer(0, &held_bytes).unwrap();
        // One transfer each: 4096 bytes at page offset 1 take both map registers.
        let a = board.write(&pattern(4096, 11), 1).unwrap();
        let b = board.read(4096, 1).unwrap();
        assert_eq!(done(&a).status, Err(Error::IoTimeout));
        // B is not programmed while the abandoned DMA runs.
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            b.try_completed().is_none(),
            "B completed while edu was busy"
        );
        assert_eq!(board.chip().stats().commands, 1);
        assert_eq!(
            board.chip().stats().ignored_writes,
            0,
            "the driver wrote the DMA registers of a busy engine"
        );
        if device_recovers {
            // The device ends A's DMA late: its read of A's buffer is blocked (the mapping
            // is gone) and recorded; then B runs and reads what the device buffer holds.
            board.chip().set_hold(false);
            board.chip().release();
            let got = done(&b);
            assert_eq!(got.status, Ok(()));
            assert_eq!(got.information, 4096);
            assert_eq!(output(&b, 4096), held_bytes);
            assert_eq!(board.chip().stats().commands, 2);
            assert_eq!(board.chip().stats().ignored_writes, 0);
            assert!(
                !board.sim().sanitizer_record().is_empty(),
                "the late DMA was blocked"
            );
            board.sim().clear_sanitizer();
        } else {
            // The device stays busy: B times out too, without ever being programmed.
            assert_eq!(done(&b).status, Err(Error::IoTimeout));
            assert_eq!(board.chip().stats().commands, 1);
            assert_eq!(board.chip().stats().ignored_writes, 0);
            board.chip().reset();
        }
        wait_for(|| board.edu().requests_in_flight() == 0);
        drop((a, b));
        board.shut_down().unwrap();
    }
}
