//! The system-mode sample driver (`system_sample`) on the simulated system DMA controller:
//! normal completion of reads and writes over several transfers, a DMA error, a timeout that
//! stops a stalled transfer, a user cancel mid-transfer (with the bytes reached before the
//! stop), a cancel while the request waits for the channel, a cancel racing the completion,
//! transfers reported from a DPC instead of the callback, and release and the next execute
//! from inside the transfer-complete callback. Every request completes exactly once with the
//! bytes that reached the device as its information, and the platform ends clean.

mod system_sample;

use std::time::Duration;

use dmatx::Error;
use dmatx_runtime::{Completed, RequestHandle};
use dmatx_sim::{SimBuffer, SystemCompletion, SystemFault};
use system_sample::{RX_CHANNEL, Sample, Setup, TX_CHANNEL};

const WAIT: Duration = Duration::from_secs(10);
const PAGE: usize = 4096;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(37) ^ seed ^ (i >> 9) as u8)
        .collect()
}

fn done(handle: &RequestHandle<SimBuffer>) -> Completed {
    let c = handle.wait_timeout(WAIT).expect("the request completes");
    assert_eq!(handle.refused_completions(), 0, "completed exactly once");
    c
}

fn read_back(handle: &RequestHandle<SimBuffer>) -> Vec<u8> {
    let out = handle.output().expect("a read's buffer");
    let mut bytes = vec![0; out.len() as usize];
    out.read(0, &mut bytes).unwrap();
    bytes
}

#[test]
fn writes_and_reads_complete_with_every_byte_over_several_transfers() {
    let s = Sample::new(Setup::default());
    let pump = s.pump();
    let data = pattern(3 * PAGE + 100, 1);
    let w = s.write(&data, 0x80);
    let c = done(&w);
    assert_eq!((c.status, c.information), (Ok(()), data.len() as u64));
    assert_eq!(
        s.driver().tx.take_received(),
        data,
        "every byte in the FIFO"
    );
    let source = pattern(2 * PAGE, 2);
    s.driver().rx.push_source(&source);
    let r = s.read(source.len() as u64, 0x10);
    let c = done(&r);
    assert_eq!((c.status, c.information), (Ok(()), source.len() as u64));
    assert_eq!(read_back(&r), source);
    drop(pump);
    // Transfers of at most 4096 bytes: 4 for the write, 2 for the read.
    assert_eq!(s.count(|c| &c.transfers), 6);
    assert_eq!(
        s.count(|c| &c.bytes_programmed),
        (data.len() + source.len()) as u64
    );
    assert_eq!(s.count(|c| &c.completed_in_callback), 6);
    assert_eq!(
        s.count(|c| &c.released_in_callback),
        2,
        "the callback held the last reference both times"
    );
    s.shut_down();
}

#[test]
fn a_dma_error_completes_the_request_with_device_data_error_and_the_bytes_moved() {
    let s = Sample::new(Setup::default());
    s.driver()
        .controller
        .inject(TX_CHANNEL, 1, SystemFault::ErrorAt(100))
        .unwrap();
    let pump = s.pump();
    let data = pattern(3 * PAGE, 3);
    let c = done(&s.write(&data, 0));
    assert_eq!(
        (c.status, c.information),
        (Err(Error::DeviceDataError), PAGE as u64 + 100)
    );
    assert_eq!(s.driver().tx.take_received(), data[..PAGE + 100]);
    assert_eq!(s.count(|c| &c.transfers), 2, "no transfer after the error");
    // The channel is free for the next request.
    let c = done(&s.write(&data[..10], 0));
    assert_eq!((c.status, c.information), (Ok(()), 10));
    drop(pump);
    s.shut_down();
}

#[test]
fn a_timeout_stops_a_stalled_transfer_and_completes_timed_out() {
    let s = Sample::new(Setup {
        timeout: Duration::from_millis(20),
        ..Setup::default()
    });
    s.driver()
        .controller
        .inject(RX_CHANNEL, 1, SystemFault::Stall)
        .unwrap();
    s.driver().rx.push_source(&pattern(2 * PAGE, 4));
    let r = s.read(2 * PAGE as u64, 0);
    // The first transfer completes before the timer can fire; the second stalls.
    assert!(s.driver().controller.step());
    let pump = s.pump();
    let c = done(&r);
    assert_eq!(
        (c.status, c.information),
        (Err(Error::IoTimeout), PAGE as u64),
        "the first transfer moved, the stalled one was stopped"
    );
    assert_eq!(read_back(&r)[..PAGE], pattern(2 * PAGE, 4)[..PAGE]);
    assert!(read_back(&r)[PAGE..].iter().all(|&b| b == 0xEE));
    assert_eq!(s.count(|c| &c.timeouts), 1);
    assert_eq!(s.count(|c| &c.stops_running), 1);
    let stats = s.driver().controller.channel_stats(RX_CHANNEL).unwrap();
    assert_eq!((stats.completed, stats.cancelled), (2, 1));
    drop(pump);
    s.shut_down();
}

#[test]
fn a_user_cancel_mid_transfer_stops_it_where_it_had_reached() {
    // Deferred completion in virtual time: the second transfer is stopped halfway.
    let s = Sample::new(Setup {
        mode: SystemCompletion::Deferred { latency_ns: 1000 },
        ..Setup::default()
    });
    let controller = &s.driver().controller;
    let data = pattern(3 * PAGE, 5);
    let w = s.write(&data, 0);
    assert_eq!(controller.advance(1000), 1, "the first transfer");
    assert_eq!(controller.advance(500), 0, "the second is halfway");
    assert_eq!(w.cancel(), Ok(true));
    assert_eq!(s.count(|c| &c.stops_running), 1);
    assert!(
        w.try_completed().is_none(),
        "completes when the controller reports"
    );
    assert_eq!(controller.advance(0), 1, "the stopped transfer is reported");
    let c = done(&w);
    let reached = PAGE + PAGE / 2;
    assert_eq!(
        (c.status, c.information),
        (Err(Error::Cancelled), reached as u64)
    );
    assert_eq!(s.driver().tx.take_received(), data[..reached]);
    assert_eq!(s.count(|c| &c.transfers), 2);
    s.shut_down();
}

#[test]
fn a_cancel_while_waiting_for_the_channel_withdraws_the_request() {
    let s = Sample::new(Setup::default());
    let controller = &s.driver().controller;
    let first = pattern(PAGE, 6);
    let a = s.write(&first, 0);
    let b = s.write(&pattern(PAGE, 7), 0);
    assert!(controller.channel_owned(TX_CHANNEL));
    assert_eq!(
        s.count(|c| &c.transfers),
        1,
        "b waits for the channel a holds"
    );
    assert_eq!(b.cancel(), Ok(true));
    let c = done(&b);
    assert_eq!((c.status, c.information), (Err(Error::Cancelled), 0));
    assert_eq!(s.count(|c| &c.stops_withdrawn), 1);
    assert_eq!(controller.run_pending(), 1);
    let c = done(&a);
    assert_eq!((c.status, c.information), (Ok(()), PAGE as u64));
    assert_eq!(s.driver().tx.take_received(), first, "b moved nothing");
    s.shut_down();
}

#[test]
fn a_request_cancelled_while_waiting_for_a_slot_never_starts() {
    let s = Sample::new(Setup {
        slots: 1,
        ..Setup::default()
    });
    let a = s.write(&pattern(PAGE, 8), 0);
    let b = s.write(&pattern(PAGE, 9), 0);
    assert_eq!(
        b.cancel(),
        Ok(true),
        "held by the driver, not cancelable yet"
    );
    assert!(b.try_completed().is_none());
    assert_eq!(s.driver().controller.run_pending(), 1);
    let (ca, cb) = (done(&a), done(&b));
    assert_eq!((ca.status, ca.information), (Ok(()), PAGE as u64));
    assert_eq!((cb.status, cb.information), (Err(Error::Cancelled), 0));
    assert_eq!(s.count(|c| &c.transfers), 1);
    s.shut_down();
}

/// One round of a cancel racing the controller's completions: returns whether the cancel won.
fn cancel_race_round(s: &Sample, round: usize) -> bool {
    let data = pattern(2 * PAGE, round as u8);
    let w = s.write(&data, 0);
    let controller = s.driver().controller.clone();
    let stepper = std::thread::spawn(move || while controller.step() {});
    std::thread::yield_now();
    let _ = w.cancel();
    stepper.join().unwrap();
    // A stop that landed after the last step is delivered now.
    s.driver().controller.run_pending();
    let c = done(&w);
    let moved = s.driver().tx.take_received();
    assert_eq!(
        moved,
        data[..moved.len()],
        "round {round}: a prefix of the data"
    );
    assert_eq!(
        c.information,
        moved.len() as u64,
        "round {round}: the information is the bytes that reached the FIFO"
    );
    match c.status {
        Ok(()) => {
            assert_eq!(moved.len(), data.len(), "round {round}: success moved all");
            false
        }
        Err(Error::Cancelled) => {
            // A cancel that lost to the last transfer completes the request successfully.
            assert!(moved.len() < data.len(), "round {round}: cancelled short");
            true
        }
        other => panic!("round {round}: {other:?}"),
    }
}

#[test]
fn a_cancel_racing_the_completion_completes_each_request_once() {
    let s = Sample::new(Setup::default());
    let mut cancelled = 0;
    let rounds = 200;
    for round in 0..rounds {
        if cancel_race_round(&s, round) {
            cancelled += 1;
        }
    }
    println!("cancel race: {cancelled} of {rounds} cancelled");
    assert!(
        s.count(|c| &c.stops_running) + s.count(|c| &c.stops_not_running) > 0,
        "some cancel reached the transfer"
    );
    s.shut_down();
}

#[test]
fn transfers_reported_from_a_dpc_complete_reads_and_writes() {
    let s = Sample::new(Setup {
        complete_in_dpc: true,
        ..Setup::default()
    });
    let pump = s.pump();
    let data = pattern(5 * PAGE, 10);
    s.driver().rx.push_source(&data);
    let w = s.write(&data, 0x200);
    let r = s.read(data.len() as u64, 0x300);
    let (cw, cr) = (done(&w), done(&r));
    assert_eq!((cw.status, cw.information), (Ok(()), data.len() as u64));
    assert_eq!((cr.status, cr.information), (Ok(()), data.len() as u64));
    assert_eq!(s.driver().tx.take_received(), data);
    assert_eq!(read_back(&r), data);
    drop(pump);
    s.wait_dpcs();
    let transfers = s.count(|c| &c.transfers);
    assert_eq!(transfers, 10, "5 transfers of 4096 bytes each");
    assert_eq!(s.count(|c| &c.completed_in_dpc), transfers);
    assert_eq!(s.count(|c| &c.completed_in_callback), 0);
    s.shut_down();
}

#[test]
fn the_callback_releases_and_executes_the_next_request() {
    // One slot: each request after the first waits, and starts from inside the callback that
    // finished the one before — on the transaction it just released.
    let s = Sample::new(Setup {
        slots: 1,
        ..Setup::default()
    });
    let chunks: Vec<Vec<u8>> = (0..4).map(|i| pattern(PAGE + 10 * i, i as u8)).collect();
    let handles: Vec<_> = chunks.iter().map(|c| s.write(c, 0)).collect();
    assert_eq!(s.count(|c| &c.transfers), 1);
    s.driver().controller.run_pending();
    for (h, chunk) in handles.iter().zip(&chunks) {
        let c = done(h);
        assert_eq!((c.status, c.information), (Ok(()), chunk.len() as u64));
    }
    assert_eq!(s.driver().tx.take_received(), chunks.concat(), "in order");
    assert_eq!(s.count(|c| &c.released_in_callback), 4);
    assert_eq!(s.count(|c| &c.started_from_callback), 3);
    s.shut_down();
}

#[test]
fn two_slots_on_one_channel_take_turns() {
    let s = Sample::new(Setup::default());
    let controller = &s.driver().controller;
    let (a, b) = (pattern(2 * PAGE, 11), pattern(PAGE, 12));
    let (ha, hb) = (s.write(&a, 0), s.write(&b, 0));
    assert_eq!(
        s.count(|c| &c.transfers),
        1,
        "b is executed and waits for the channel"
    );
    assert_eq!(controller.run_pending(), 3);
    assert_eq!(done(&ha).status, Ok(()));
    assert_eq!(done(&hb).status, Ok(()));
    assert_eq!(s.driver().tx.take_received(), [a, b].concat());
    s.shut_down();
}

#[test]
fn a_zero_length_read_is_refused_and_frees_its_slot() {
    let s = Sample::new(Setup {
        slots: 1,
        ..Setup::default()
    });
    let c = done(&s.read(0, 0));
    assert_eq!(
        (c.status, c.information),
        (Err(Error::InvalidDeviceRequest), 0)
    );
    let pump = s.pump();
    let c = done(&s.write(&[1, 2, 3], 0));
    assert_eq!((c.status, c.information), (Ok(()), 3));
    drop(pump);
    s.shut_down();
}

/// A stream of writes on both slots with the controller running free, planned DMA errors and
/// stalls (ended by the timeout), and cancels from another thread. Each request fills its
/// buffer with its own byte value; at the end the FIFO holds, for every value, exactly the
/// bytes its requests reported, and a request that succeeded reported all of its bytes.
#[test]
fn a_stream_with_errors_stalls_and_cancels_completes_every_request_once() {
    stream(false);
}

#[test]
fn a_stream_reported_from_a_dpc_completes_every_request_once() {
    stream(true);
}

fn stream(complete_in_dpc: bool) {
    const REQUESTS: usize = 300;
    let s = Sample::new(Setup {
        timeout: Duration::from_millis(5),
        fifo_bytes: REQUESTS * 3 * PAGE,
        complete_in_dpc,
        ..Setup::default()
    });
    let mut rng = 0x9E37_79B9_7F4A_7C15_u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for transfer in 0..4 * REQUESTS as u64 {
        match next() % 100 {
            0..3 => s
                .driver()
                .controller
                .inject(TX_CHANNEL, transfer, SystemFault::ErrorAt(next() % 4096))
                .unwrap(),
            3..5 => s
                .driver()
                .controller
                .inject(TX_CHANNEL, transfer, SystemFault::Stall)
                .unwrap(),
            _ => {}
        }
    }
    let pump = s.pump();
    let mut requests = Vec::new();
    let (to_cancel, cancels) = std::sync::mpsc::channel::<RequestHandle<SimBuffer>>();
    let canceller = std::thread::spawn(move || {
        for h in cancels {
            let _ = h.cancel();
        }
    });
    for k in 0..REQUESTS {
        let value = (k % 250) as u8 + 1;
        let len = 1 + (next() % (3 * PAGE as u64)) as usize;
        let h = s.write(&vec![value; len], next() % 4096);
        if next() % 10 == 0 {
            to_cancel.send(h.clone()).unwrap();
        }
        requests.push((h, value, len as u64));
    }
    drop(to_cancel);
    canceller.join().unwrap();
    let mut expected = [0u64; 256];
    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    for (h, value, len) in &requests {
        let c = done(h);
        assert!(c.information <= *len);
        match c.status {
            Ok(()) => assert_eq!(c.information, *len, "success reports every byte"),
            Err(Error::DeviceDataError | Error::IoTimeout | Error::Cancelled) => {}
            other => panic!("unexpected status {other:?}"),
        }
        expected[usize::from(*value)] += c.information;
        *outcomes.entry(format!("{:?}", c.status)).or_default() += 1;
    }
    drop(pump);
    let mut received = [0u64; 256];
    for b in s.driver().tx.take_received() {
        received[usize::from(b)] += 1;
    }
    assert_eq!(
        received, expected,
        "the FIFO holds exactly the reported bytes"
    );
    for status in ["Ok(())", "Err(DeviceDataError)", "Err(IoTimeout)"] {
        assert!(outcomes.contains_key(status), "no {status}: {outcomes:?}");
    }
    println!(
        "stream outcomes: {outcomes:?}; stops: {} running, {} not running, {} withdrawn",
        s.count(|c| &c.stops_running),
        s.count(|c| &c.stops_not_running),
        s.count(|c| &c.stops_withdrawn)
    );
    s.shut_down();
}
