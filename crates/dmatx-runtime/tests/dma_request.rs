//! Transactions initialized from requests (spec §2.2 "InitializeUsingRequest"; statements
//! 22–26 and 55): direction and transfer-method rules, lengths, the binding, and completing a
//! request whose DMA is executing.

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};

use common::{assert_clean, buffer, device, verified_device};
use dmatx::{
    Completion, Direction, DmaDevice, DmaVersion, Enabler, EnablerConfig, Error, Profile,
    SgElement, Transaction,
};
use dmatx_runtime::dma::{initialize_using_request, request_of};
use dmatx_runtime::{
    Device, Dispatch, IoctlCode, Queue, QueueConfig, Request, RequestHandle, RequestMemory,
    RequestSpec, TransferMethod,
};
use dmatx_sim::{SimBuffer, SimPlatform};

#[derive(Default)]
struct Ctx {
    held: Mutex<Vec<Request<SimBuffer>>>,
}

type Q = Queue<Ctx, SimBuffer>;
type Tx = Transaction<SimPlatform, Arc<Programs>, RequestMemory<SimBuffer>>;

/// Bytes of each program-DMA call.
#[derive(Default)]
struct Programs(Mutex<Vec<u64>>);

fn program(_: &Tx, log: &Arc<Programs>, _: Direction, sg: &[SgElement]) -> bool {
    log.0
        .lock()
        .unwrap()
        .push(sg.iter().map(|e| u64::from(e.length)).sum());
    true
}

fn hold(q: &Q, r: Request<SimBuffer>, _: u64) {
    q.device().context().held.lock().unwrap().push(r);
}

fn hold_ioctl(q: &Q, r: Request<SimBuffer>, _: u64, _: u64, _: IoctlCode) {
    q.device().context().held.lock().unwrap().push(r);
}

struct Rig {
    sim: SimPlatform,
    queue: Q,
    tx: Arc<Tx>,
}

fn rig_with(dev: Device<Ctx>, profile: Profile, version: DmaVersion) -> Rig {
    let sim = SimPlatform::new();
    let dma = DmaDevice::new(sim.clone());
    let enabler = Enabler::create(
        &dma,
        EnablerConfig::new(profile, 4096)
            .with_version(version)
            .with_verifier(false),
    )
    .unwrap();
    dev.attach_dma(&dma).unwrap();
    let queue = Q::create(
        &dev,
        QueueConfig {
            read: Some(hold),
            write: Some(hold),
            device_control: Some(hold_ioctl),
            internal_device_control: Some(hold_ioctl),
            power_managed: false,
            ..QueueConfig::new(Dispatch::Parallel)
        },
    )
    .unwrap();
    let tx = Tx::create(&enabler).unwrap();
    Rig { sim, queue, tx }
}

fn rig() -> Rig {
    rig_with(
        device(Ctx::default()),
        Profile::ScatterGather64,
        DmaVersion::V3,
    )
}

impl Rig {
    fn submit(
        &self,
        spec: RequestSpec<SimBuffer>,
    ) -> (RequestHandle<SimBuffer>, Request<SimBuffer>) {
        let h = self.queue.submit(spec).unwrap();
        let r = self
            .queue
            .device()
            .context()
            .held
            .lock()
            .unwrap()
            .pop()
            .unwrap();
        (h, r)
    }

    fn buf(&self, len: u64) -> SimBuffer {
        buffer(&self.sim, len)
    }

    fn init(&self, r: &Request<SimBuffer>, direction: Direction) -> dmatx::Result<()> {
        initialize_using_request(&self.tx, r, program, direction)
    }

    fn finish(self, requests: Vec<(RequestHandle<SimBuffer>, Request<SimBuffer>)>) {
        self.tx.release().unwrap();
        for (h, r) in &requests {
            if !r.is_completed() {
                r.complete(Ok(())).unwrap();
            }
            assert_eq!(h.refused_completions(), 0);
        }
        self.queue.device().delete().unwrap();
        let sim = self.sim.clone();
        drop(requests);
        drop(self);
        assert_clean(&sim);
    }
}

fn ioctl(method: TransferMethod) -> IoctlCode {
    IoctlCode::new(0x8000, 0x900, method, IoctlCode::ANY_ACCESS)
}

#[test]
fn stmt_022_read_with_write_to_device_and_write_with_read_from_device_are_refused() {
    let rig = rig();
    let read = rig.submit(RequestSpec::read(rig.buf(4096)));
    let write = rig.submit(RequestSpec::write(rig.buf(4096)));
    assert_eq!(
        rig.init(&read.1, Direction::WriteToDevice),
        Err(Error::InvalidDeviceRequest)
    );
    assert_eq!(
        rig.init(&write.1, Direction::ReadFromDevice),
        Err(Error::InvalidDeviceRequest)
    );
    assert!(request_of(&rig.tx).is_none(), "nothing bound on error");
    rig.init(&read.1, Direction::ReadFromDevice).unwrap();
    assert_eq!(rig.tx.length(), 4096);
    rig.tx.release().unwrap();
    rig.init(&write.1, Direction::WriteToDevice).unwrap();
    assert_eq!(rig.tx.direction(), Direction::WriteToDevice);
    rig.finish(vec![read, write]);
}

#[test]
fn stmt_023_a_zero_length_request_is_invalid_device_request() {
    let rig = rig();
    // An IOCTL whose output buffer is absent has length 0; so does an empty buffer.
    let no_output = rig.submit(RequestSpec::device_control(
        ioctl(TransferMethod::OutDirect),
        Some(rig.buf(64)),
        None,
    ));
    assert_eq!(no_output.1.output_length(), 0);
    assert_eq!(
        rig.init(&no_output.1, Direction::ReadFromDevice),
        Err(Error::InvalidDeviceRequest),
        "not InvalidParameter"
    );
    let empty = rig.sim.allocate_buffer(0, 0).expect("an empty buffer");
    let zero = rig.submit(RequestSpec::read(empty));
    assert_eq!(zero.1.output_length(), 0);
    assert_eq!(
        rig.init(&zero.1, Direction::ReadFromDevice),
        Err(Error::InvalidDeviceRequest)
    );
    rig.finish(vec![no_output, zero]);
}

#[test]
fn stmt_024_method_neither_is_invalid_device_request_both_ways() {
    let rig = rig();
    let req = rig.submit(RequestSpec::device_control(
        ioctl(TransferMethod::Neither),
        Some(rig.buf(64)),
        Some(rig.buf(64)),
    ));
    for d in [Direction::ReadFromDevice, Direction::WriteToDevice] {
        assert_eq!(rig.init(&req.1, d), Err(Error::InvalidDeviceRequest));
    }
    rig.finish(vec![req]);
}

#[test]
fn stmt_025_buffered_uses_the_input_length_writing_and_the_output_length_reading() {
    let rig = rig();
    let req = rig.submit(RequestSpec::device_control(
        ioctl(TransferMethod::Buffered),
        Some(rig.buf(100)),
        Some(rig.buf(300)),
    ));
    rig.init(&req.1, Direction::WriteToDevice).unwrap();
    assert_eq!(rig.tx.length(), 100);
    rig.tx.release().unwrap();
    rig.init(&req.1, Direction::ReadFromDevice).unwrap();
    assert_eq!(rig.tx.length(), 300);
    // Internal device control follows the same rules.
    rig.tx.release().unwrap();
    let internal = rig.submit(RequestSpec::internal_device_control(
        ioctl(TransferMethod::Buffered),
        Some(rig.buf(10)),
        Some(rig.buf(20)),
    ));
    rig.init(&internal.1, Direction::WriteToDevice).unwrap();
    assert_eq!(rig.tx.length(), 10);
    rig.finish(vec![req, internal]);
}

#[test]
fn stmt_026_get_request_returns_the_bound_request_and_none_after_a_plain_initialize() {
    let rig = rig();
    let req = rig.submit(RequestSpec::read(rig.buf(4096)));
    rig.init(&req.1, Direction::ReadFromDevice).unwrap();
    let bound = request_of(&rig.tx).expect("bound");
    assert_eq!(bound.id(), req.1.id());
    rig.tx.release().unwrap();
    assert!(request_of(&rig.tx).is_none(), "release clears the binding");
    // A plain initialize with the same memory binds nothing.
    let memory = req.1.output_memory().unwrap();
    rig.tx
        .initialize_using_offset(program, Direction::ReadFromDevice, memory, 0, 4096)
        .map_err(|e| e.error)
        .unwrap();
    assert!(request_of(&rig.tx).is_none());
    rig.finish(vec![req]);
}

#[test]
fn in_direct_only_writes_and_out_direct_only_reads_both_with_the_output_buffer() {
    let rig = rig();
    let in_direct = rig.submit(RequestSpec::device_control(
        ioctl(TransferMethod::InDirect),
        Some(rig.buf(16)),
        Some(rig.buf(512)),
    ));
    let out_direct = rig.submit(RequestSpec::device_control(
        ioctl(TransferMethod::OutDirect),
        Some(rig.buf(16)),
        Some(rig.buf(768)),
    ));
    assert_eq!(
        rig.init(&in_direct.1, Direction::ReadFromDevice),
        Err(Error::InvalidDeviceRequest)
    );
    assert_eq!(
        rig.init(&out_direct.1, Direction::WriteToDevice),
        Err(Error::InvalidDeviceRequest)
    );
    rig.init(&in_direct.1, Direction::WriteToDevice).unwrap();
    assert_eq!(rig.tx.length(), 512, "output buffer and length");
    rig.tx.release().unwrap();
    rig.init(&out_direct.1, Direction::ReadFromDevice).unwrap();
    assert_eq!(rig.tx.length(), 768);
    rig.finish(vec![in_direct, out_direct]);
}

#[test]
fn a_request_without_the_buffer_it_needs_is_invalid_device_request() {
    let rig = rig();
    let buffered_no_input = rig.submit(RequestSpec::device_control(
        ioctl(TransferMethod::Buffered),
        None,
        Some(rig.buf(64)),
    ));
    assert_eq!(
        rig.init(&buffered_no_input.1, Direction::WriteToDevice),
        Err(Error::InvalidDeviceRequest)
    );
    let nothing = rig.submit(RequestSpec::internal_device_control(
        ioctl(TransferMethod::InDirect),
        None,
        None,
    ));
    assert_eq!(
        rig.init(&nothing.1, Direction::WriteToDevice),
        Err(Error::InvalidDeviceRequest)
    );
    rig.finish(vec![buffered_no_input, nothing]);
}

#[test]
fn a_v2_packet_request_past_its_first_segment_is_invalid_parameter_from_the_core() {
    let rig = rig_with(device(Ctx::default()), Profile::Packet64, DmaVersion::V2);
    let chain = rig.sim.allocate_chain(&[(4096, 0), (4096, 0)]).unwrap();
    let req = rig.submit(RequestSpec::read(chain));
    assert_eq!(
        rig.init(&req.1, Direction::ReadFromDevice),
        Err(Error::InvalidParameter)
    );
    assert!(request_of(&rig.tx).is_none());
    rig.finish(vec![req]);
}

#[test]
fn initializing_from_a_completed_request_is_misuse() {
    let rig = rig();
    let req = rig.submit(RequestSpec::read(rig.buf(64)));
    req.1.complete(Ok(())).unwrap();
    assert!(matches!(
        rig.init(&req.1, Direction::ReadFromDevice),
        Err(Error::ObjectMisuse(m)) if m.call == "WdfDmaTransactionInitializeUsingRequest"
    ));
    rig.finish(vec![req]);
}

#[test]
fn stmt_055_completing_the_request_while_its_dma_executes_is_misuse() {
    let rig = rig();
    let (h, r) = rig.submit(RequestSpec::read(rig.buf(3 * 4096)));
    rig.init(&r, Direction::ReadFromDevice).unwrap();
    // Bound but not executing: completion would be allowed; execute takes hold of it.
    let log = Arc::new(Programs::default());
    rig.tx.execute(Arc::clone(&log)).unwrap();
    let e = r.complete(Ok(())).unwrap_err();
    assert!(matches!(e, Error::ObjectMisuse(m) if m.call == "WdfRequestComplete"));
    assert!(h.try_completed().is_none(), "the request is left as it was");
    assert_eq!(h.refused_completions(), 1);
    // Between transfers it is still refused; after the completion that finishes, allowed.
    assert_eq!(
        rig.tx.dma_completed(),
        Ok(Completion::MoreProcessingRequired)
    );
    assert!(r.complete(Ok(())).is_err());
    assert_eq!(
        rig.tx.dma_completed(),
        Ok(Completion::MoreProcessingRequired)
    );
    assert_eq!(rig.tx.dma_completed(), Ok(Completion::Finished(Ok(()))));
    r.complete_with_information(Ok(()), rig.tx.bytes_transferred())
        .unwrap();
    assert_eq!(h.wait().information, 3 * 4096);
    assert_eq!(log.0.lock().unwrap().as_slice(), &[4096, 4096, 4096]);
    assert_eq!(h.refused_completions(), 2);
    rig.tx.release().unwrap();
    rig.queue.device().delete().unwrap();
    let sim = rig.sim.clone();
    drop((h, r, rig));
    assert_clean(&sim);
}

#[test]
fn stmt_055_the_verifier_panics_and_the_transaction_finishes_normally() {
    let rig = rig_with(
        verified_device(Ctx::default()),
        Profile::ScatterGather64,
        DmaVersion::V3,
    );
    let (h, r) = rig.submit(RequestSpec::write(rig.buf(4096)));
    rig.init(&r, Direction::WriteToDevice).unwrap();
    rig.tx.execute(Arc::new(Programs::default())).unwrap();
    let panic = catch_unwind(AssertUnwindSafe(|| {
        let _ = r.complete(Ok(()));
    }))
    .expect_err("verifier panic");
    let text = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(text.contains("statement 55"), "{text}");
    assert_eq!(rig.tx.dma_completed(), Ok(Completion::Finished(Ok(()))));
    r.complete(Ok(())).unwrap();
    assert_eq!(h.wait().status, Ok(()));
    rig.tx.release().unwrap();
    rig.queue.device().delete().unwrap();
    let sim = rig.sim.clone();
    drop((h, r, rig));
    assert_clean(&sim);
}

#[test]
fn stmt_055_holds_while_any_of_two_transactions_on_the_request_executes() {
    // A request can back two transactions (e.g. its buffer split in halves): completing it is
    // refused until both have finished, not just the first.
    let rig = rig();
    let (h, r) = rig.submit(RequestSpec::read(rig.buf(4096)));
    let second = Tx::create(&rig.tx.enabler()).unwrap();
    rig.init(&r, Direction::ReadFromDevice).unwrap();
    initialize_using_request(&second, &r, program, Direction::ReadFromDevice).unwrap();
    let log = Arc::new(Programs::default());
    rig.tx.execute(Arc::clone(&log)).unwrap();
    second.execute(Arc::clone(&log)).unwrap();
    assert_eq!(rig.tx.dma_completed(), Ok(Completion::Finished(Ok(()))));
    assert!(
        r.complete(Ok(())).is_err(),
        "the second transaction still executes"
    );
    assert_eq!(second.dma_completed(), Ok(Completion::Finished(Ok(()))));
    r.complete(Ok(())).unwrap();
    assert_eq!(h.refused_completions(), 1);
    second.release().unwrap();
    rig.tx.release().unwrap();
    rig.queue.device().delete().unwrap();
    let sim = rig.sim.clone();
    drop((h, r, second, rig));
    assert_clean(&sim);
}
