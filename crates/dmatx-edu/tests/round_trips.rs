//! Round trips through the simulated edu: write then read back, and loopback, at every size
//! and page offset of interest, verified byte by byte, with the transfer counts checked.

use std::time::Duration;

use dmatx_edu::sim::{BoardConfig, SimEduBoard};
use dmatx_edu::{Completion, EduConfig};
use dmatx_runtime::{Completed, RequestHandle};
use dmatx_sim::SimBuffer;

const SIZES: [usize; 7] = [1, 100, 4095, 4096, 4097, 65536, 1 << 20];
const OFFSETS: [u64; 4] = [0, 1, 0x800, 4095];
const WAIT: Duration = Duration::from_secs(10);

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_left(7) as u8 ^ seed)
        .collect()
}

fn done(h: &RequestHandle<SimBuffer>) -> Completed {
    h.wait_timeout(WAIT).expect("the request completes")
}

fn output(h: &RequestHandle<SimBuffer>, n: usize) -> Vec<u8> {
    let mut out = vec![0; n];
    h.output().unwrap().read(0, &mut out).unwrap();
    out
}

/// The expected result of reading `n` bytes after writing `written`: each transfer of at most
/// `max` bytes reads the start of the device buffer.
fn expected_read(buffer: &[u8], n: usize, max: usize) -> Vec<u8> {
    (0..n).map(|i| buffer[i % max]).collect()
}

fn run_round_trips(config: BoardConfig) {
    let max = config.driver.transfer_length() as usize;
    let board = SimEduBoard::new(config).unwrap();
    for (k, &n) in SIZES.iter().enumerate() {
        for (j, &offset) in OFFSETS.iter().enumerate() {
            let data = pattern(n, (k * 4 + j) as u8);
            let before = board.edu().stats();

            // Loopback: every byte comes back, one write and one read per chunk.
            let out_offset = OFFSETS[(j + 1) % OFFSETS.len()];
            let h = board.loopback(&data, offset, out_offset).unwrap();
            assert_eq!(
                done(&h),
                Completed {
                    status: Ok(()),
                    information: n as u64
                },
                "loopback {n} at {offset:#x}"
            );
            assert!(
                output(&h, n) == data,
                "loopback {n} at {offset:#x}: bytes differ"
            );
            let after = board.edu().stats();
            let chunks = n.div_ceil(max) as u64;
            assert_eq!(
                after.transfers_to_device - before.transfers_to_device,
                chunks
            );
            assert_eq!(after.transfers_to_ram - before.transfers_to_ram, chunks);
            drop(h);

            // Write, then read back: the buffer holds the last transfer's bytes at its start.
            let w = board.write(&data, offset).unwrap();
            assert_eq!(
                done(&w),
                Completed {
                    status: Ok(()),
                    information: n as u64
                }
            );
            let chip_buffer = board.chip().device_buffer();
            let last = (n - 1) / max * max;
            assert_eq!(
                &chip_buffer[..n - last],
                &data[last..],
                "write {n}: the last transfer's bytes"
            );
            let r = board.read(n as u64, out_offset).unwrap();
            assert_eq!(
                done(&r),
                Completed {
                    status: Ok(()),
                    information: n as u64
                }
            );
            let back = output(&r, n);
            if n <= max {
                assert!(back == data, "write+read {n} at {offset:#x}: bytes differ");
            } else {
                assert!(
                    back == expected_read(&chip_buffer, n, max),
                    "read {n}: the buffer once per transfer"
                );
            }
            let end = board.edu().stats();
            assert_eq!(end.transfers_to_device - after.transfers_to_device, chunks);
            assert_eq!(end.transfers_to_ram - after.transfers_to_ram, chunks);
            assert_eq!(w.refused_completions() + r.refused_completions(), 0);
        }
    }
    let s = board.edu().stats();
    assert_eq!(s.timeouts + s.cancelled, 0);
    assert_eq!(s.bytes_to_device, s.bytes_to_ram);
    let chip = board.chip().stats();
    assert_eq!((chip.refused, chip.faults, chip.clamps), (0, 0, 0));
    assert_eq!(chip.bytes_to_device, s.bytes_to_device);
    board.shut_down().unwrap();
}

#[test]
fn interrupt_completion() {
    run_round_trips(BoardConfig::default());
}

#[test]
fn polled_completion() {
    let config = BoardConfig {
        driver: EduConfig {
            completion: Completion::Polled {
                interval: Duration::from_micros(50),
            },
            ..EduConfig::default()
        },
        ..BoardConfig::default()
    };
    let board_polls_and_claims_nothing = {
        let board = SimEduBoard::new(config.clone()).unwrap();
        let h = board.loopback(&pattern(10_000, 3), 5, 0).unwrap();
        assert_eq!(done(&h).status, Ok(()));
        assert!(output(&h, 10_000) == pattern(10_000, 3));
        let stats = board.edu().stats();
        assert!(stats.polls >= 6);
        assert_eq!(stats.interrupts_claimed, 0);
        assert_eq!(board.chip().stats().interrupts_raised, 0);
        drop(h);
        board.shut_down()
    };
    board_polls_and_claims_nothing.unwrap();
    run_round_trips(config);
}

#[test]
fn with_one_transfer_of_map_registers() {
    run_round_trips(BoardConfig::default().one_transfer_of_registers());
}

#[test]
fn msi_delivery() {
    let config = BoardConfig {
        edu: dmatx_sim::SimEduConfig {
            msi: true,
            ..Default::default()
        },
        ..BoardConfig::default()
    };
    let board = SimEduBoard::new(config).unwrap();
    let data = pattern(20_000, 9);
    let h = board.loopback(&data, 7, 9).unwrap();
    assert_eq!(done(&h).status, Ok(()));
    assert!(output(&h, data.len()) == data);
    assert_eq!(board.edu().stats().interrupts_claimed, 10);
    drop(h);
    board.shut_down().unwrap();
}

#[test]
fn erratum_setting_uses_4095_byte_transfers() {
    let config = BoardConfig {
        edu: dmatx_sim::SimEduConfig {
            erratum_end_abort: true,
            ..Default::default()
        },
        driver: EduConfig {
            max_transfer: dmatx_edu::hw::ERRATUM_MAX_TRANSFER,
            ..EduConfig::default()
        },
        ..BoardConfig::default()
    };
    run_round_trips(config);
}
