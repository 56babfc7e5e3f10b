//! The runtime's `tracing` events (`docs/TRACING.md`): one read through a queue, served by
//! scatter/gather DMA in two transfers, each reported by an interrupt whose DPC completes it;
//! and the framework's completions (no handler, cancelled while held, purged at delete).
//!
//! Needs the `tracing` feature: `cargo test -p dmatx-runtime --features tracing --test tracing`.
//! The subscriber is the process's global default (the DPC runs on a worker thread), so this
//! binary holds this one test.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dmatx::{Completion, Direction, DmaDevice, Enabler, EnablerConfig, Profile, SgElement};
use dmatx_runtime::{
    Completed, Device, Dispatch, Interrupt, InterruptConfig, Queue, QueueConfig, Request,
    RequestMemory, RequestSpec, dma,
};
use dmatx_sim::{
    CompletionMode, DeviceCompletion, DeviceConfig, SimBuffer, SimDmaDevice, SimPlatform,
};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

type Tx = dmatx::Transaction<SimPlatform, SimDmaDevice, RequestMemory<SimBuffer>>;

/// One thing the subscriber saw: an event, or a span entered or exited.
#[derive(Clone, Debug)]
struct Seen {
    /// `event`, `enter` or `exit`.
    what: &'static str,
    name: &'static str,
    target: &'static str,
    fields: BTreeMap<String, String>,
    thread: std::thread::ThreadId,
}

impl Seen {
    fn field(&self, name: &str) -> &str {
        self.fields
            .get(name)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("{} has no field {name}: {self:?}", self.name))
    }

    fn label(&self) -> String {
        match self.what {
            "event" => self.name.to_owned(),
            what => format!("{what} {}", self.name),
        }
    }
}

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

/// A subscriber that keeps everything from `dmatx` and `dmatx_runtime`.
#[derive(Default)]
struct Collector {
    seen: Mutex<Vec<Seen>>,
    spans: Mutex<Vec<(&'static Metadata<'static>, BTreeMap<String, String>)>>,
}

impl Collector {
    fn push(
        &self,
        what: &'static str,
        meta: &'static Metadata<'static>,
        fields: BTreeMap<String, String>,
    ) {
        self.seen.lock().unwrap().push(Seen {
            what,
            name: meta.name(),
            target: meta.target(),
            fields,
            thread: std::thread::current().id(),
        });
    }

    fn span(&self, id: &Id) -> (&'static Metadata<'static>, BTreeMap<String, String>) {
        self.spans.lock().unwrap()[id.into_u64() as usize - 1].clone()
    }

    fn take(&self) -> Vec<Seen> {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

impl Subscriber for Collector {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        matches!(metadata.target(), "dmatx" | "dmatx_runtime")
    }

    fn new_span(&self, span: &Attributes<'_>) -> Id {
        let mut fields = BTreeMap::new();
        span.record(&mut Fields(&mut fields));
        let mut spans = self.spans.lock().unwrap();
        spans.push((span.metadata(), fields));
        Id::from_u64(spans.len() as u64)
    }

    fn record(&self, span: &Id, values: &Record<'_>) {
        let mut spans = self.spans.lock().unwrap();
        values.record(&mut Fields(&mut spans[span.into_u64() as usize - 1].1));
    }

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut fields = BTreeMap::new();
        event.record(&mut Fields(&mut fields));
        self.push("event", event.metadata(), fields);
    }

    fn enter(&self, span: &Id) {
        let (meta, fields) = self.span(span);
        self.push("enter", meta, fields);
    }

    fn exit(&self, span: &Id) {
        let (meta, fields) = self.span(span);
        self.push("exit", meta, fields);
    }
}

// ---------------------------------------------------------------------------------------------
// The driver: the crate docs' read driver, with a device the test steps by hand.

struct Driver {
    tx: Arc<Tx>,
    hw: SimDmaDevice,
    status: Mutex<Option<DeviceCompletion>>,
}

fn program_dma(t: &Tx, hw: &SimDmaDevice, direction: Direction, sg: &[SgElement]) -> bool {
    hw.start(direction, sg, t.bytes_transferred());
    true
}

fn on_read(queue: &Queue<Driver, SimBuffer>, request: Request<SimBuffer>, _length: u64) {
    let driver = queue.device().context();
    dma::initialize_using_request(&driver.tx, &request, program_dma, Direction::ReadFromDevice)
        .unwrap();
    driver.tx.execute(driver.hw.clone()).unwrap();
}

fn isr(interrupt: &Interrupt<Driver>, _message: u32) -> bool {
    let ours = interrupt
        .device()
        .context()
        .status
        .lock()
        .unwrap()
        .is_some();
    ours && interrupt.queue_dpc().is_ok()
}

fn dpc(interrupt: &Interrupt<Driver>) {
    let driver = interrupt.device().context();
    if driver.status.lock().unwrap().take().is_none() {
        return;
    }
    if let Ok(Completion::Finished(status)) = driver.tx.dma_completed() {
        let request = dma::request_of(&driver.tx).unwrap();
        let bytes = driver.tx.bytes_transferred();
        driver.tx.release().unwrap();
        request.complete_with_information(status, bytes).unwrap();
    }
}

#[test]
fn a_read_through_a_queue_and_an_interrupt() {
    let collector = Arc::new(Collector::default());
    tracing::subscriber::set_global_default(Arc::clone(&collector)).unwrap();

    let sim = SimPlatform::new();
    let dma_device = DmaDevice::new(sim.clone());
    let enabler = Enabler::create(
        &dma_device,
        EnablerConfig::new(Profile::ScatterGather64, 16384),
    )
    .unwrap();
    let hw = SimDmaDevice::new(
        &sim.last_adapter().unwrap(),
        DeviceConfig::default().mode(CompletionMode::Manual),
    );
    let tx = Tx::create(&enabler).unwrap();
    let tx_id = tx.id().to_string();
    let device = Device::new(Driver {
        tx,
        hw: hw.clone(),
        status: Mutex::new(None),
    });
    device.attach_dma(&dma_device).unwrap();
    let interrupt = Interrupt::create(
        &device,
        InterruptConfig {
            isr,
            dpc: Some(dpc),
        },
    )
    .unwrap();
    let queue = Queue::create(
        &device,
        QueueConfig {
            read: Some(on_read),
            ..QueueConfig::new(Dispatch::Parallel)
        },
    )
    .unwrap();
    let (dev, line) = (device.clone(), interrupt.clone());
    hw.set_completion_handler(move |c| {
        *dev.context().status.lock().unwrap() = Some(c);
        let _ = line.raise(7);
    });

    // Completed by the framework: no write handler; a read cancelled while the queue holds it
    // (the device is not powered up yet).
    let write = queue
        .submit(RequestSpec::write(sim.allocate_buffer(100, 0).unwrap()))
        .unwrap();
    let held = queue
        .submit(RequestSpec::read(sim.allocate_buffer(200, 0).unwrap()))
        .unwrap();
    assert_eq!(held.cancel(), Ok(true));
    let seen = collector.take();
    let runtime: Vec<(String, &str, String)> = seen
        .iter()
        .map(|s| {
            let extra = match s.name {
                "request.submit" => format!("{} {}", s.field("kind"), s.field("length")),
                "request.complete" => {
                    format!("{} {}", s.field("status"), s.field("information"))
                }
                _ => String::new(),
            };
            (s.label(), s.field("request"), extra)
        })
        .collect();
    let (w, h) = (write.id().to_string(), held.id().to_string());
    assert_eq!(
        runtime,
        [
            ("request.submit".into(), w.as_str(), "write 100".into()),
            (
                "request.complete".into(),
                w.as_str(),
                "InvalidDeviceRequest 0".into()
            ),
            ("request.submit".into(), h.as_str(), "read 200".into()),
            ("request.complete".into(), h.as_str(), "Cancelled 0".into()),
        ]
    );

    // The read: submitted, delivered, two transfers each ended by an interrupt and its DPC.
    device.power_up().unwrap();
    let read = queue
        .submit(RequestSpec::read(sim.allocate_buffer(32768, 0).unwrap()))
        .unwrap();
    for _ in 0..2 {
        assert!(hw.step());
        assert!(interrupt.wait_dpc_idle(Duration::from_secs(10)));
    }
    let done = read.wait_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(
        done,
        Completed {
            status: Ok(()),
            information: 32768
        }
    );
    let seen = collector.take();
    let id = read.id().to_string();
    let runtime: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.target == "dmatx_runtime")
        .collect();
    // Per thread, since the DPC may run before the ISR that queued it has returned: the
    // stepping thread submits and takes the interrupts, the interrupt's worker runs the DPCs.
    let me = std::thread::current().id();
    let on = |mine: bool| -> Vec<String> {
        runtime
            .iter()
            .filter(|s| (s.thread == me) == mine)
            .map(|s| s.label())
            .collect()
    };
    assert_eq!(
        on(true),
        [
            "request.submit",
            "request.deliver",
            "enter interrupt.isr",
            "exit interrupt.isr",
            "enter interrupt.isr",
            "exit interrupt.isr",
        ]
        .map(String::from),
        "{seen:#?}"
    );
    assert_eq!(
        on(false),
        [
            "enter interrupt.dpc",
            "exit interrupt.dpc",
            "enter interrupt.dpc",
            "request.complete",
            "exit interrupt.dpc",
        ]
        .map(String::from),
        "{seen:#?}"
    );
    for s in runtime.iter().filter(|s| s.name.starts_with("request.")) {
        assert_eq!(s.field("request"), id);
    }
    assert_eq!(
        (runtime[0].field("kind"), runtime[0].field("length")),
        ("read", "32768")
    );
    for s in runtime.iter().filter(|s| s.name == "interrupt.isr") {
        assert_eq!(s.field("message"), "7");
        assert!(s.fields.contains_key("claimed") || s.what == "enter");
    }
    let isr_exits: Vec<&str> = runtime
        .iter()
        .filter(|s| s.name == "interrupt.isr" && s.what == "exit")
        .map(|s| s.field("claimed"))
        .collect();
    assert_eq!(
        isr_exits,
        ["true", "true"],
        "claimed is recorded before exit"
    );
    let complete = runtime
        .iter()
        .find(|s| s.name == "request.complete")
        .unwrap();
    assert_eq!(
        (complete.field("status"), complete.field("information")),
        ("success", "32768")
    );

    // The core's events of the same run, in the runtime's frame: the transaction's use lies
    // between delivery and completion, and its second transfer is programmed from the DPC.
    let position = |label: &str, nth: usize| {
        seen.iter()
            .enumerate()
            .filter(|(_, s)| s.label() == label)
            .nth(nth)
            .unwrap_or_else(|| panic!("no {label} #{nth}: {seen:#?}"))
            .0
    };
    assert!(position("enter interrupt.isr", 0) < position("enter interrupt.dpc", 0));
    assert!(position("enter interrupt.isr", 1) < position("enter interrupt.dpc", 1));
    assert!(position("request.deliver", 0) < position("tx.initialize", 0));
    assert!(position("tx.release", 0) < position("request.complete", 0));
    assert!(position("enter interrupt.dpc", 0) < position("enter tx.program_dma", 1));
    assert!(position("enter tx.program_dma", 1) < position("exit interrupt.dpc", 0));
    for s in seen.iter().filter(|s| s.target == "dmatx") {
        assert_eq!(s.field("tx"), tx_id);
    }
    let completions: Vec<(&str, &str)> = seen
        .iter()
        .filter(|s| s.name == "tx.completed")
        .map(|s| (s.field("length"), s.field("finished")))
        .collect();
    assert_eq!(completions, [("16384", "false"), ("16384", "true")]);

    // Purged at delete: a read held while the device is powered down.
    device.power_down().unwrap();
    let purged = queue
        .submit(RequestSpec::read(sim.allocate_buffer(300, 0).unwrap()))
        .unwrap();
    hw.clear_completion_handler();
    device.delete().unwrap();
    assert_eq!(
        purged.wait_timeout(Duration::from_secs(10)).unwrap().status,
        Err(dmatx::Error::Cancelled)
    );
    let seen = collector.take();
    let labels: Vec<(String, &str)> = seen
        .iter()
        .filter(|s| s.target == "dmatx_runtime")
        .map(|s| (s.label(), s.field("request")))
        .collect();
    let p = purged.id().to_string();
    assert_eq!(
        labels,
        [
            ("request.submit".into(), p.as_str()),
            ("request.complete".into(), p.as_str()),
        ]
    );
    drop((read, queue, interrupt, device, enabler));
    sim.check_clean().unwrap();
}
