//! The core's `tracing` events (`docs/TRACING.md`): names, fields and order for one
//! scatter/gather transaction of two transfers on the simulated platform, and the rule that no
//! event is emitted under the transaction's lock (the subscriber here calls back into the
//! transaction on every event, which would deadlock otherwise).
//!
//! Needs the `tracing` feature: `cargo test -p dmatx --features tracing --test tracing`.

use dmatx::{Completion, Direction, DmaDevice, Enabler, EnablerConfig, Profile, SgElement};
use dmatx_sim::{SimBuffer, SimPlatform};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

type Tx = dmatx::Transaction<SimPlatform, (), SimBuffer>;

/// One thing the subscriber saw: an event, or a span entered or exited.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    /// `event`, `enter` or `exit`.
    what: &'static str,
    name: &'static str,
    fields: BTreeMap<String, String>,
    /// The transaction's state as the subscriber read it through the public API.
    state: String,
}

impl Seen {
    fn field(&self, name: &str) -> &str {
        self.fields
            .get(name)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("{} has no field {name}: {self:?}", self.name))
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

/// A subscriber that keeps everything with target `dmatx` and, on every event and span
/// entry, reads the transaction's state through `probe`.
#[derive(Default)]
struct Collector {
    seen: Mutex<Vec<Seen>>,
    spans: Mutex<Vec<(&'static str, BTreeMap<String, String>)>>,
    probe: OnceLock<Arc<Tx>>,
}

impl Collector {
    fn state(&self) -> String {
        // Locks the transaction: hangs (a spin lock) if the event came from under its lock.
        self.probe
            .get()
            .map_or_else(String::new, |t| format!("{:?}", t.state()))
    }

    fn push(&self, what: &'static str, name: &'static str, fields: BTreeMap<String, String>) {
        let state = self.state();
        self.seen.lock().unwrap().push(Seen {
            what,
            name,
            fields,
            state,
        });
    }

    fn span(&self, id: &Id) -> (&'static str, BTreeMap<String, String>) {
        self.spans.lock().unwrap()[id.into_u64() as usize - 1].clone()
    }
}

impl Subscriber for Collector {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.target() == "dmatx"
    }

    fn new_span(&self, span: &Attributes<'_>) -> Id {
        let mut fields = BTreeMap::new();
        span.record(&mut Fields(&mut fields));
        let mut spans = self.spans.lock().unwrap();
        spans.push((span.metadata().name(), fields));
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
        self.push("event", event.metadata().name(), fields);
    }

    fn enter(&self, span: &Id) {
        let (name, fields) = self.span(span);
        self.push("enter", name, fields);
    }

    fn exit(&self, span: &Id) {
        let (name, fields) = self.span(span);
        self.push("exit", name, fields);
    }
}

/// What program-DMA was given, per call.
static PROGRAMMED: Mutex<Vec<usize>> = Mutex::new(Vec::new());

fn program(t: &Tx, _: &(), _: Direction, sg: &[SgElement]) -> bool {
    // Program-DMA runs with no transaction lock held, inside its span.
    assert_eq!(t.state(), dmatx::State::Transfer);
    PROGRAMMED.lock().unwrap().push(sg.len());
    true
}

#[test]
fn one_sg_transaction_of_two_transfers() {
    let sim = SimPlatform::new();
    let device = DmaDevice::new(sim.clone());
    let enabler =
        Enabler::create(&device, EnablerConfig::new(Profile::ScatterGather64, 16384)).unwrap();
    let t = Tx::create(&enabler).unwrap();
    let other = Tx::create(&enabler).unwrap();
    assert_ne!(t.id(), other.id(), "ids are unique per transaction");
    let id = t.id().to_string();

    let collector = Arc::new(Collector::default());
    collector.probe.set(Arc::clone(&t)).ok().unwrap();
    let dispatch = tracing::Dispatch::from(Arc::clone(&collector));

    let buffer = sim.allocate_buffer(32768, 0).unwrap();
    let buffer = tracing::dispatcher::with_default(&dispatch, || {
        t.initialize_using_offset(program, Direction::WriteToDevice, buffer, 0, 32768)
            .unwrap();
        t.execute(()).unwrap();
        assert_eq!(t.dma_completed(), Ok(Completion::MoreProcessingRequired));
        assert_eq!(t.dma_completed(), Ok(Completion::Finished(Ok(()))));
        t.release().unwrap().unwrap()
    });
    let seen = collector.seen.lock().unwrap().clone();

    // Every record names this transaction.
    for s in &seen {
        assert_eq!(s.field("tx"), id, "{s:?}");
    }
    let names: Vec<String> = seen
        .iter()
        .map(|s| match s.what {
            "event" => s.name.to_owned(),
            what => format!("{what} {}", s.name),
        })
        .collect();
    assert_eq!(
        names,
        [
            // initialize
            "tx.initialize",
            "tx.state",
            // execute: the first transfer
            "tx.execute",
            "tx.state",
            "hal.allocate",
            "hal.map",
            "enter tx.program_dma",
            "exit tx.program_dma",
            // the first completion: the second transfer
            "hal.flush",
            "hal.free",
            "hal.allocate",
            "tx.completed",
            "hal.map",
            "enter tx.program_dma",
            "exit tx.program_dma",
            // the last completion
            "hal.flush",
            "tx.completed",
            "tx.state",
            "hal.free",
            // release
            "tx.state",
            "tx.release",
        ]
        .map(String::from),
        "{seen:#?}"
    );

    let at = |i: usize| &seen[i];
    assert_eq!(at(0).field("direction"), "to_device");
    assert_eq!(at(0).field("length"), "32768");
    let states: Vec<(&str, &str, &str)> = seen
        .iter()
        .filter(|s| s.name == "tx.state")
        .map(|s| (s.field("from"), s.field("to"), s.state.as_str()))
        .collect();
    assert_eq!(
        states,
        [
            ("Created", "Initialized", "Initialized"),
            ("Initialized", "Transfer", "Transfer"),
            ("Transfer", "TransferCompleted", "TransferCompleted"),
            ("TransferCompleted", "Released", "Released"),
        ],
        "each transition, and the state the subscriber could read when it was emitted"
    );
    for s in seen.iter().filter(|s| s.name == "hal.allocate") {
        assert_eq!(s.field("outcome"), "granted");
        assert!(s.field("registers").parse::<u32>().unwrap() >= 4, "{s:?}");
    }
    let programmed = PROGRAMMED.lock().unwrap().clone();
    let maps: Vec<_> = seen.iter().filter(|s| s.name == "hal.map").collect();
    let spans: Vec<_> = seen.iter().filter(|s| s.what == "enter").collect();
    for (i, (map, span)) in maps.iter().zip(&spans).enumerate() {
        let elements = programmed[i].to_string();
        assert_eq!(map.field("bytes"), "16384");
        assert_eq!(map.field("elements"), elements);
        assert_eq!(span.field("transfer"), i.to_string());
        assert_eq!(span.field("offset"), (i * 16384).to_string());
        assert_eq!(span.field("length"), "16384");
        assert_eq!(span.field("elements"), elements);
        assert_eq!(span.state, "Transfer");
    }
    for s in seen.iter().filter(|s| s.name == "hal.flush") {
        assert_eq!(s.field("bytes"), "16384");
    }
    let completions: Vec<(&str, &str, &str)> = seen
        .iter()
        .filter(|s| s.name == "tx.completed")
        .map(|s| (s.field("length"), s.field("finished"), s.field("status")))
        .collect();
    assert_eq!(
        completions,
        [("16384", "false", "success"), ("16384", "true", "success")]
    );

    // A second use counts its transfers from 0 again, under the same id; a failed completion
    // reports the error's name.
    collector.seen.lock().unwrap().clear();
    tracing::dispatcher::with_default(&dispatch, || {
        t.initialize_using_offset(program, Direction::ReadFromDevice, buffer, 0, 4096)
            .unwrap();
        t.execute(()).unwrap();
        let too_long = t.dma_completed_with_length(8192);
        assert_eq!(
            too_long,
            Ok(Completion::Finished(Err(dmatx::Error::InvalidParameter)))
        );
        t.release().unwrap().unwrap();
    });
    let seen = collector.seen.lock().unwrap().clone();
    let span = seen.iter().find(|s| s.what == "enter").unwrap();
    assert_eq!(
        (span.field("tx"), span.field("transfer")),
        (id.as_str(), "0")
    );
    assert_eq!(seen[0].field("direction"), "from_device");
    let completed = seen.iter().find(|s| s.name == "tx.completed").unwrap();
    assert_eq!(
        (completed.field("finished"), completed.field("status")),
        ("true", "InvalidParameter")
    );
    assert_eq!(seen.last().unwrap().name, "tx.release");

    // Cancel returns its answer as an event (nothing queued here).
    collector.seen.lock().unwrap().clear();
    let buffer = sim.allocate_buffer(4096, 0).unwrap();
    tracing::dispatcher::with_default(&dispatch, || {
        t.initialize_using_offset(program, Direction::WriteToDevice, buffer, 0, 4096)
            .unwrap();
        assert_eq!(t.cancel(), Ok(false));
        t.release().unwrap().unwrap();
    });
    let seen = collector.seen.lock().unwrap().clone();
    let cancel = seen.iter().find(|s| s.name == "tx.cancel").unwrap();
    assert_eq!(cancel.field("cancelled"), "false");

    drop((t, other));
    sim.check_clean().unwrap();
}
