//! The trace recorder: a [`tracing_subscriber::Layer`] that keeps the events and spans named
//! in `docs/TRACING.md` and turns them into Chrome/Perfetto trace-event JSON (the format of
//! that document's section "The timeline").
//!
//! Recording is cheap and does not build JSON: each callback visits its fields into a reused
//! per-thread buffer, then takes one lock to append a compact 40-byte record and its
//! fields to two vectors. The vocabulary is applied only in [`Recorder::finish`], which pairs
//! the records into slices:
//!
//! | records | become |
//! |---|---|
//! | an enter and the matching exit of any span | an `"X"` event on the thread's track |
//! | `request.submit` … `request.complete` (same `request`) | async `"b"`/`"e"`, category `request` |
//! | `tx.initialize` … `tx.release` (same `tx`) | async, category `transaction` |
//! | the first enter of a `tx.program_dma` span … the next `tx.completed` of its `tx` | async, category `transfer` |
//! | `device.start` … `device.done` (same `channel`) | async, category `device` |
//! | every other event, known or not | an `"i"` instant with its fields as `args` |
//!
//! A slice still open when the recording ends is closed at the last recorded time with
//! `"unfinished": true` in the end's `args`, so the output always pairs. An end with no begin
//! (the begin happened before the recording) is written as an instant. The number of records
//! is bounded ([`DEFAULT_EVENT_LIMIT`]); past it events are counted, not kept, and the count is
//! written in `otherData.dropped_events`.
//!
//! ```
//! use dmatx_cli::trace::Recorder;
//! use tracing_subscriber::layer::SubscriberExt;
//!
//! let recorder = Recorder::new();
//! let subscriber = tracing_subscriber::registry().with(recorder.clone());
//! tracing::subscriber::with_default(subscriber, || {
//!     tracing::debug!(name: "tx.initialize", tx = 1u64, direction = "to_device", length = 4096u64);
//!     tracing::debug!(name: "tx.release", tx = 1u64);
//! });
//! let json: serde_json::Value = serde_json::from_str(&recorder.finish()).unwrap();
//! assert!(json["traceEvents"].as_array().unwrap().iter().any(|e| e["ph"] == "b"));
//! ```

use serde_json::{Map, Value, json};
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;
use tracing::field::{Field, Visit};
use tracing::span;
use tracing::{Event, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// Records kept before further events are only counted: two million, a few hundred MiB at
/// most.
pub const DEFAULT_EVENT_LIMIT: usize = 2_000_000;

/// The process id written in the trace (one process per recording).
const PID: u64 = 1;

/// Collects `tracing` events and spans and writes them as trace-event JSON. Cheap to clone:
/// clones share the recording, so keep one to call [`finish`](Self::finish) and give another
/// to the subscriber as a layer.
#[derive(Clone)]
pub struct Recorder {
    inner: Arc<Inner>,
}

impl fmt::Debug for Recorder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.inner.lock();
        f.debug_struct("Recorder")
            .field("records", &state.records.len())
            .field("dropped", &state.dropped)
            .field("limit", &self.inner.limit)
            .finish()
    }
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

struct Inner {
    start: Instant,
    limit: usize,
    /// Set once the limit is reached, so that later events skip visiting their fields.
    full: AtomicBool,
    state: Mutex<State>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while recording leaves the vectors consistent (each push is whole).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Default)]
struct State {
    records: Vec<Record>,
    fields: Vec<(&'static str, FieldValue)>,
    threads: HashMap<u32, Arc<str>>,
    dropped: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Event,
    NewSpan,
    SpanRecord,
    Enter,
    Exit,
}

/// One callback, as recorded: 40 bytes plus its fields in the shared field vector.
#[derive(Clone, Copy)]
struct Record {
    ts_ns: u64,
    /// The span's id for span callbacks.
    span: u64,
    /// The event's or the new span's metadata.
    meta: Option<&'static Metadata<'static>>,
    tid: u32,
    kind: Kind,
    fields_start: u32,
    fields_len: u16,
}

/// A field's value, as `tracing` handed it over.
#[derive(Clone, Debug, PartialEq)]
enum FieldValue {
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
    Str(Box<str>),
}

impl FieldValue {
    fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U64(v) => Some(v),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    fn to_json(&self) -> Value {
        match self {
            Self::U64(v) => json!(v),
            Self::I64(v) => json!(v),
            Self::F64(v) => json!(v),
            Self::Bool(v) => json!(v),
            Self::Str(s) => json!(s),
        }
    }
}

/// Visits fields into a vector.
struct Collect<'a>(&'a mut Vec<(&'static str, FieldValue)>);

impl Visit for Collect<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.push((field.name(), FieldValue::F64(value)));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.push((field.name(), FieldValue::I64(value)));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.push((field.name(), FieldValue::U64(value)));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.push((field.name(), FieldValue::Bool(value)));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push((field.name(), FieldValue::Str(value.into())));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .push((field.name(), FieldValue::Str(format!("{value:?}").into())));
    }
}

thread_local! {
    /// This thread's number in traces and its name.
    static THREAD: (u32, Arc<str>) = {
        static NEXT: AtomicU32 = AtomicU32::new(1);
        // ORDERING: only uniqueness matters.
        let tid = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = std::thread::current()
            .name()
            .map_or_else(|| format!("thread {tid}"), str::to_owned);
        (tid, name.into())
    };
    /// Reused buffer the fields are visited into before the lock is taken.
    static SCRATCH: RefCell<Vec<(&'static str, FieldValue)>> = const { RefCell::new(Vec::new()) };
}

impl Recorder {
    /// A recorder whose clock starts now, keeping up to [`DEFAULT_EVENT_LIMIT`] records.
    pub fn new() -> Self {
        Self::with_limit(DEFAULT_EVENT_LIMIT)
    }

    /// A recorder keeping at most `limit` records (events, span enters and exits); later ones
    /// are counted as dropped.
    pub fn with_limit(limit: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                start: Instant::now(),
                limit,
                full: AtomicBool::new(limit == 0),
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// Records kept so far.
    pub fn recorded(&self) -> usize {
        self.inner.lock().records.len()
    }

    /// Records dropped so far because the limit was reached.
    pub fn dropped(&self) -> u64 {
        self.inner.lock().dropped
    }

    /// Installs this recorder (over a registry) as the process's global subscriber, so every
    /// thread's events reach it.
    ///
    /// # Errors
    /// A message if a global subscriber was already installed.
    pub fn install_global(&self) -> Result<(), String> {
        use tracing_subscriber::layer::SubscriberExt;
        let subscriber = tracing_subscriber::registry().with(self.clone());
        tracing::subscriber::set_global_default(subscriber)
            .map_err(|e| format!("cannot install the trace recorder: {e}"))
    }

    /// A dispatcher of this recorder over a registry, to install per thread or around a
    /// closure with [`tracing::dispatcher::with_default`].
    pub fn dispatch(&self) -> tracing::Dispatch {
        use tracing_subscriber::layer::SubscriberExt;
        tracing::Dispatch::new(tracing_subscriber::registry().with(self.clone()))
    }

    /// Takes what was recorded so far (the recorder starts over, same clock) and returns it as
    /// trace-event JSON text (`{"traceEvents": [...], "displayTimeUnit": "ns", "otherData":
    /// {...}}`).
    pub fn finish(&self) -> String {
        let state = std::mem::take(&mut *self.inner.lock());
        // ORDERING: the flag only saves work; the lock decides what is kept.
        self.inner
            .full
            .store(self.inner.limit == 0, Ordering::Relaxed);
        build(state, self.inner.limit)
    }

    fn push(
        &self,
        kind: Kind,
        span: u64,
        meta: Option<&'static Metadata<'static>>,
        visit: impl FnOnce(&mut Collect<'_>),
    ) {
        let inner = &*self.inner;
        // ORDERING: a stale false only costs the visit below; the count is taken under the lock.
        if inner.full.load(Ordering::Relaxed) {
            inner.lock().dropped += 1;
            return;
        }
        let (tid, thread_name) = THREAD.with(|t| (t.0, Arc::clone(&t.1)));
        SCRATCH.with(|scratch| {
            // A field's Debug that itself records would find the buffer borrowed: it then gets
            // its own.
            let mut own = Vec::new();
            let mut borrowed = scratch.try_borrow_mut().ok();
            let buffer = borrowed.as_deref_mut().unwrap_or(&mut own);
            buffer.clear();
            visit(&mut Collect(buffer));
            let mut state = inner.lock();
            if state.records.len() >= inner.limit
                || state.fields.len() + buffer.len() > u32::MAX as usize
            {
                state.dropped += 1;
                inner.full.store(true, Ordering::Relaxed);
                return;
            }
            // The time is taken under the lock so that records are in time order.
            let ts_ns = inner.start.elapsed().as_nanos() as u64;
            let fields_start = state.fields.len() as u32;
            let fields_len = buffer.len().min(usize::from(u16::MAX));
            state.fields.extend(buffer.drain(..fields_len));
            state.threads.entry(tid).or_insert(thread_name);
            state.records.push(Record {
                ts_ns,
                span,
                meta,
                tid,
                kind,
                fields_start,
                fields_len: fields_len as u16,
            });
        });
    }
}

impl<S: Subscriber> Layer<S> for Recorder {
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, _: Context<'_, S>) {
        self.push(Kind::NewSpan, id.into_u64(), Some(attrs.metadata()), |v| {
            attrs.record(v)
        });
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, _: Context<'_, S>) {
        self.push(Kind::SpanRecord, id.into_u64(), None, |v| values.record(v));
    }

    fn on_enter(&self, id: &span::Id, _: Context<'_, S>) {
        self.push(Kind::Enter, id.into_u64(), None, |_| {});
    }

    fn on_exit(&self, id: &span::Id, _: Context<'_, S>) {
        self.push(Kind::Exit, id.into_u64(), None, |_| {});
    }

    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        self.push(Kind::Event, 0, Some(event.metadata()), |v| event.record(v));
    }
}

// ---------------------------------------------------------------------------------------------
// Building the JSON.

type Fields<'a> = &'a [(&'static str, FieldValue)];

fn get<'a>(fields: Fields<'a>, name: &str) -> Option<&'a FieldValue> {
    fields
        .iter()
        .rev()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
}

fn get_u64(fields: Fields<'_>, name: &str) -> Option<u64> {
    get(fields, name).and_then(FieldValue::as_u64)
}

fn get_str<'a>(fields: Fields<'a>, name: &str) -> Option<&'a str> {
    match get(fields, name) {
        Some(FieldValue::Str(s)) => Some(s),
        _ => None,
    }
}

fn args(fields: Fields<'_>) -> Value {
    let mut map = Map::new();
    for (name, value) in fields {
        map.insert((*name).to_owned(), value.to_json());
    }
    Value::Object(map)
}

fn us(ts_ns: u64) -> f64 {
    ts_ns as f64 / 1000.0
}

/// A span as known from its creation and later `record`s.
struct SpanInfo {
    meta: &'static Metadata<'static>,
    fields: Vec<(&'static str, FieldValue)>,
    entered: bool,
}

/// An async slice that has begun.
struct Open {
    name: String,
    id: Value,
}

/// Pairs records into slices; see the module docs.
struct Builder {
    /// Each event's time (ns) and its JSON text: serialized at once, since a tree of two million
    /// `Value`s would take gigabytes.
    events: Vec<(u64, String)>,
    /// Open async slices by category and key.
    open: HashMap<(&'static str, u64), Open>,
    /// Open transfers per transaction, oldest first.
    transfers: HashMap<u64, VecDeque<Open>>,
}

impl Builder {
    fn push(&mut self, ts: u64, event: Value) {
        self.events.push((ts, event.to_string()));
    }

    fn begin(&mut self, cat: &'static str, key: u64, open: Open, ts: u64, tid: u32, a: Value) {
        if let Some(previous) = self.open.remove(&(cat, key)) {
            self.end_open(cat, previous, ts, tid, json!({"unfinished": true}));
        }
        self.push(
            ts,
            json!({
                "ph": "b", "cat": cat, "name": open.name, "id": open.id,
                "ts": us(ts), "pid": PID, "tid": tid, "args": a,
            }),
        );
        self.open.insert((cat, key), open);
    }

    fn end_open(&mut self, cat: &str, open: Open, ts: u64, tid: u32, a: Value) {
        self.push(
            ts,
            json!({
                "ph": "e", "cat": cat, "name": open.name, "id": open.id,
                "ts": us(ts), "pid": PID, "tid": tid, "args": a,
            }),
        );
    }

    /// Ends the open slice `(cat, key)`; false if there is none.
    fn end(&mut self, cat: &'static str, key: u64, ts: u64, tid: u32, a: Value) -> bool {
        match self.open.remove(&(cat, key)) {
            Some(open) => {
                self.end_open(cat, open, ts, tid, a);
                true
            }
            None => false,
        }
    }

    fn close_transfers(&mut self, tx: u64, ts: u64, tid: u32) {
        for open in self.transfers.remove(&tx).unwrap_or_default() {
            self.end_open("transfer", open, ts, tid, json!({"unfinished": true}));
        }
    }

    fn instant(&mut self, meta: &Metadata<'_>, ts: u64, tid: u32, fields: Fields<'_>) {
        self.push(
            ts,
            json!({
                "ph": "i", "s": "t", "cat": meta.target(), "name": meta.name(),
                "ts": us(ts), "pid": PID, "tid": tid, "args": args(fields),
            }),
        );
    }

    /// Applies the vocabulary to one event.
    fn event(&mut self, meta: &Metadata<'_>, ts: u64, tid: u32, f: Fields<'_>) {
        let handled = match (meta.name(), get_u64(f, "request"), get_u64(f, "tx")) {
            ("request.submit", Some(request), _) => {
                let kind = get_str(f, "kind").unwrap_or("request");
                let open = Open {
                    name: format!("{kind} {request}"),
                    id: json!(request),
                };
                self.begin("request", request, open, ts, tid, args(f));
                true
            }
            ("request.complete", Some(request), _) => {
                self.end("request", request, ts, tid, args(f))
            }
            ("tx.initialize", _, Some(tx)) => {
                self.close_transfers(tx, ts, tid);
                let open = Open {
                    name: format!("tx {tx}"),
                    id: json!(tx),
                };
                self.begin("transaction", tx, open, ts, tid, args(f));
                true
            }
            ("tx.release", _, Some(tx)) => {
                self.close_transfers(tx, ts, tid);
                self.end("transaction", tx, ts, tid, args(f))
            }
            ("tx.completed", _, Some(tx)) => {
                let open = self.transfers.get_mut(&tx).and_then(VecDeque::pop_front);
                match open {
                    Some(open) => {
                        self.end_open("transfer", open, ts, tid, args(f));
                        true
                    }
                    None => false,
                }
            }
            ("device.start", ..) | ("device.done", ..) => match get_u64(f, "channel") {
                Some(channel) if meta.name() == "device.start" => {
                    let open = Open {
                        name: format!("channel {channel}"),
                        id: json!(channel),
                    };
                    self.begin("device", channel, open, ts, tid, args(f));
                    true
                }
                Some(channel) => self.end("device", channel, ts, tid, args(f)),
                None => false,
            },
            _ => false,
        };
        if !handled {
            self.instant(meta, ts, tid, f);
        }
    }

    /// The first enter of a `tx.program_dma` span begins its transfer.
    fn transfer(&mut self, span: &SpanInfo, ts: u64, tid: u32) {
        let Some(tx) = get_u64(&span.fields, "tx") else {
            return;
        };
        let transfer = get_u64(&span.fields, "transfer");
        let (name, id) = match transfer {
            Some(n) => (format!("tx {tx} #{n}"), format!("{tx}.{n}")),
            None => (format!("tx {tx} transfer"), format!("{tx}.?")),
        };
        self.push(
            ts,
            json!({
                "ph": "b", "cat": "transfer", "name": name, "id": id,
                "ts": us(ts), "pid": PID, "tid": tid, "args": args(&span.fields),
            }),
        );
        self.transfers.entry(tx).or_default().push_back(Open {
            name,
            id: json!(id),
        });
    }
}

fn build(state: State, limit: usize) -> String {
    let State {
        records,
        fields,
        threads,
        dropped,
    } = state;
    let mut b = Builder {
        events: Vec::with_capacity(records.len()),
        open: HashMap::new(),
        transfers: HashMap::new(),
    };
    let mut spans: HashMap<u64, SpanInfo> = HashMap::new();
    // Enter times per (thread, span): a span can be entered again before it exits.
    let mut entered: HashMap<(u32, u64), Vec<u64>> = HashMap::new();
    let last = records.last().map_or(0, |r| r.ts_ns);
    for r in &records {
        let start = r.fields_start as usize;
        let f = &fields[start..start + usize::from(r.fields_len)];
        match r.kind {
            Kind::Event => {
                if let Some(meta) = r.meta {
                    b.event(meta, r.ts_ns, r.tid, f);
                }
            }
            Kind::NewSpan => {
                if let Some(meta) = r.meta {
                    // Span ids are reused after a close: the newest creation wins.
                    spans.insert(
                        r.span,
                        SpanInfo {
                            meta,
                            fields: f.to_vec(),
                            entered: false,
                        },
                    );
                }
            }
            Kind::SpanRecord => {
                if let Some(span) = spans.get_mut(&r.span) {
                    span.fields.extend_from_slice(f);
                }
            }
            Kind::Enter => {
                if let Some(span) = spans.get_mut(&r.span) {
                    if !span.entered && span.meta.name() == "tx.program_dma" {
                        span.entered = true;
                        let span = &spans[&r.span];
                        b.transfer(span, r.ts_ns, r.tid);
                    }
                    entered.entry((r.tid, r.span)).or_default().push(r.ts_ns);
                }
            }
            Kind::Exit => {
                let enter = entered.get_mut(&(r.tid, r.span)).and_then(Vec::pop);
                if let (Some(enter), Some(span)) = (enter, spans.get(&r.span)) {
                    b.push(
                        enter,
                        json!({
                            "ph": "X", "cat": span.meta.target(), "name": span.meta.name(),
                            "ts": us(enter), "dur": us(r.ts_ns - enter),
                            "pid": PID, "tid": r.tid, "args": args(&span.fields),
                        }),
                    );
                }
            }
        }
    }
    // Close what is still open at the last recorded time.
    let mut still: Vec<((u32, u64), u64)> = entered
        .into_iter()
        .flat_map(|(k, v)| v.into_iter().map(move |t| (k, t)))
        .collect();
    still.sort_by_key(|&((tid, span), t)| (t, tid, span));
    for ((tid, span), enter) in still {
        if let Some(span) = spans.get(&span) {
            let mut a = args(&span.fields);
            a["unfinished"] = json!(true);
            b.push(
                enter,
                json!({
                    "ph": "X", "cat": span.meta.target(), "name": span.meta.name(),
                    "ts": us(enter), "dur": us(last - enter),
                    "pid": PID, "tid": tid, "args": a,
                }),
            );
        }
    }
    let mut open: Vec<_> = b.open.drain().collect();
    open.sort_by(|a, b| (a.0.0, a.0.1).cmp(&(b.0.0, b.0.1)));
    let mut transfers: Vec<_> = b.transfers.drain().collect();
    transfers.sort_by_key(|t| t.0);
    for ((cat, _), o) in open {
        b.end_open(cat, o, last, 0, json!({"unfinished": true}));
    }
    for (_, queue) in transfers {
        for o in queue {
            b.end_open("transfer", o, last, 0, json!({"unfinished": true}));
        }
    }
    // Time order (stable: a begin stays before an end at the same time); "X" events were
    // written at their exit and move back to their start.
    b.events.sort_by_key(|e| e.0);

    let mut metadata = vec![json!({
        "ph": "M", "name": "process_name", "pid": PID, "tid": 0, "args": {"name": "dmatx"},
    })];
    let mut threads: Vec<_> = threads.into_iter().collect();
    threads.sort_by_key(|t| t.0);
    for (tid, name) in threads {
        metadata.push(json!({
            "ph": "M", "name": "thread_name", "pid": PID, "tid": tid, "args": {"name": &*name},
        }));
        metadata.push(json!({
            "ph": "M", "name": "thread_sort_index", "pid": PID, "tid": tid,
            "args": {"sort_index": tid},
        }));
    }
    let other = json!({
        "producer": "dmatx trace recorder",
        "version": env!("CARGO_PKG_VERSION"),
        "recorded_events": records.len(),
        "dropped_events": dropped,
        "event_limit": limit,
    });
    let size: usize = b.events.iter().map(|e| e.1.len() + 2).sum();
    let mut out = String::with_capacity(size + 4096);
    out.push_str("{\"traceEvents\":[\n");
    let lines = metadata
        .iter()
        .map(Value::to_string)
        .chain(b.events.into_iter().map(|e| e.1));
    for (k, line) in lines.enumerate() {
        if k > 0 {
            out.push_str(",\n");
        }
        out.push_str(&line);
    }
    out.push_str("\n],\n\"displayTimeUnit\":\"ns\",\n\"otherData\":");
    out.push_str(&other.to_string());
    out.push_str("}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::{debug, debug_span};
    use tracing_subscriber::layer::SubscriberExt;

    fn record(recorder: &Recorder, f: impl FnOnce()) -> Value {
        let subscriber = tracing_subscriber::registry().with(recorder.clone());
        tracing::subscriber::with_default(subscriber, f);
        serde_json::from_str(&recorder.finish()).expect("the recorder writes JSON")
    }

    fn events(trace: &Value) -> &Vec<Value> {
        trace["traceEvents"].as_array().expect("traceEvents")
    }

    fn with_ph<'a>(trace: &'a Value, ph: &str) -> Vec<&'a Value> {
        events(trace).iter().filter(|e| e["ph"] == ph).collect()
    }

    /// One request carrying one transaction of two transfers, with an ISR and a DPC, as the
    /// runtime, the core and the board would report it.
    fn one_request() {
        debug!(name: "request.submit", request = 7u64, kind = "write", length = 8192u64);
        debug!(name: "request.deliver", request = 7u64);
        debug!(name: "tx.initialize", tx = 3u64, direction = "to_device", length = 8192u64);
        debug!(name: "tx.execute", tx = 3u64);
        debug!(name: "hal.allocate", tx = 3u64, registers = 2u64, outcome = "granted");
        for transfer in 0..2u64 {
            debug_span!(
                "tx.program_dma",
                tx = 3u64,
                transfer,
                offset = transfer * 4096,
                length = 4096u64,
                elements = 1u64
            )
            .in_scope(|| {
                debug!(name: "device.start", channel = 0u64, start = 1u64);
            });
            debug!(name: "device.done", channel = 0u64, bytes = 4096u64, outcome = "done");
            let isr = debug_span!(
                "interrupt.isr",
                message = 0u64,
                claimed = tracing::field::Empty
            );
            isr.in_scope(|| {
                debug!(name: "device.irq", channel = 0u64);
                isr.record("claimed", true);
            });
            debug_span!("interrupt.dpc").in_scope(|| {
                debug!(name: "tx.completed", tx = 3u64, length = 4096u64, finished = transfer == 1, status = "success");
            });
        }
        debug!(name: "tx.release", tx = 3u64);
        debug!(name: "request.complete", request = 7u64, status = "success", information = 8192u64);
    }

    #[test]
    fn a_request_becomes_nested_slices_on_thread_tracks() {
        let recorder = Recorder::new();
        let trace = record(&recorder, one_request);
        assert_eq!(trace["displayTimeUnit"], "ns");
        assert_eq!(trace["otherData"]["dropped_events"], 0);

        // Async slices: category, name and id of each begin, matched by an end.
        let begins = with_ph(&trace, "b");
        let ends = with_ph(&trace, "e");
        let summary: Vec<(String, String, String)> = begins
            .iter()
            .map(|e| {
                (
                    e["cat"].to_string(),
                    e["name"].to_string(),
                    e["id"].to_string(),
                )
            })
            .collect();
        let expect =
            |c: &str, n: &str, i: &str| (format!("\"{c}\""), format!("\"{n}\""), i.to_string());
        assert_eq!(
            summary,
            [
                expect("request", "write 7", "7"),
                expect("transaction", "tx 3", "3"),
                expect("transfer", "tx 3 #0", "\"3.0\""),
                expect("device", "channel 0", "0"),
                expect("transfer", "tx 3 #1", "\"3.1\""),
                expect("device", "channel 0", "0"),
            ]
        );
        assert_eq!(ends.len(), begins.len());
        // Each begin's end is the first unused end of the same category, id and name.
        let mut used = vec![false; ends.len()];
        for b in &begins {
            let k = (0..ends.len())
                .find(|&k| {
                    let e = ends[k];
                    !used[k] && e["cat"] == b["cat"] && e["id"] == b["id"] && e["name"] == b["name"]
                })
                .unwrap_or_else(|| panic!("no end for {b}"));
            used[k] = true;
            let e = ends[k];
            assert!(e["ts"].as_f64() >= b["ts"].as_f64());
            assert!(e["args"].get("unfinished").is_none(), "{e}");
        }
        let request_end = ends.iter().find(|e| e["cat"] == "request").unwrap();
        assert_eq!(request_end["args"]["information"], 8192);
        let transfer_end = ends.iter().find(|e| e["id"] == "3.1").unwrap();
        assert_eq!(transfer_end["args"]["finished"], true);

        // Spans: complete events with their fields, the ISR's `claimed` recorded on exit.
        let spans = with_ph(&trace, "X");
        let names: Vec<&str> = spans.iter().map(|e| e["name"].as_str().unwrap()).collect();
        assert_eq!(
            names,
            [
                "tx.program_dma",
                "interrupt.isr",
                "interrupt.dpc",
                "tx.program_dma",
                "interrupt.isr",
                "interrupt.dpc"
            ]
        );
        assert_eq!(spans[3]["args"]["transfer"], 1);
        assert_eq!(spans[1]["args"]["claimed"], true);
        assert!(spans.iter().all(|s| s["dur"].as_f64().unwrap() >= 0.0));

        // Everything else is an instant with its fields.
        let instants: Vec<&str> = with_ph(&trace, "i")
            .iter()
            .map(|e| e["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            instants,
            [
                "request.deliver",
                "tx.execute",
                "hal.allocate",
                "device.irq",
                "device.irq"
            ]
        );
        let allocate = with_ph(&trace, "i")[2];
        assert_eq!(allocate["args"]["outcome"], "granted");
        assert_eq!(allocate["s"], "t");

        // One thread, named, and every event on it.
        let meta = with_ph(&trace, "M");
        let thread = meta.iter().find(|m| m["name"] == "thread_name").unwrap();
        let tid = &thread["tid"];
        assert!(
            events(&trace)
                .iter()
                .filter(|e| e["ph"] != "M")
                .all(|e| &e["tid"] == tid)
        );
        // Timestamps in order.
        let ts: Vec<f64> = events(&trace)
            .iter()
            .filter_map(|e| e["ts"].as_f64())
            .collect();
        assert!(ts.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn the_recorder_output_passes_the_renderer_validation() {
        let recorder = Recorder::new();
        let text = {
            let subscriber = tracing_subscriber::registry().with(recorder.clone());
            tracing::subscriber::with_default(subscriber, one_request);
            recorder.finish()
        };
        let trace = crate::render::parse(&text).expect("valid");
        assert_eq!(trace.slices.len(), 6 + 6);
    }

    #[test]
    fn unknown_events_are_instants_with_their_fields() {
        let trace = record(&Recorder::new(), || {
            tracing::info!(name: "something.else", answer = 42i64, ratio = 0.5, flag = false, what = ?Some(3));
            tracing::warn!(target: "elsewhere", value = 1u64, "free text {}", 5);
        });
        let instants = with_ph(&trace, "i");
        assert_eq!(instants.len(), 2);
        assert_eq!(instants[0]["name"], "something.else");
        assert_eq!(
            instants[0]["args"],
            json!({"answer": 42, "ratio": 0.5, "flag": false, "what": "Some(3)"})
        );
        assert_eq!(instants[1]["cat"], "elsewhere");
        assert_eq!(instants[1]["args"]["message"], "free text 5");
    }

    #[test]
    fn unmatched_ends_are_instants_and_open_slices_are_closed() {
        let trace = record(&Recorder::new(), || {
            debug!(name: "request.complete", request = 1u64, status = "success", information = 0u64);
            debug!(name: "tx.completed", tx = 9u64, length = 1u64, finished = true, status = "success");
            debug!(name: "request.submit", request = 2u64, kind = "read", length = 10u64);
            debug!(name: "tx.initialize", tx = 4u64, direction = "from_device", length = 10u64);
            let _span = debug_span!(
                "tx.program_dma",
                tx = 4u64,
                transfer = 0u64,
                offset = 0u64,
                length = 10u64,
                elements = 1u64
            )
            .entered();
            debug!(name: "device.start", channel = 1u64, start = 1u64);
        });
        let names: Vec<&str> = with_ph(&trace, "i")
            .iter()
            .map(|e| e["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["request.complete", "tx.completed"]);
        let ends = with_ph(&trace, "e");
        assert_eq!(ends.len(), 4);
        assert!(ends.iter().all(|e| e["args"]["unfinished"] == true));
        // The span exited inside the closure: it is whole.
        assert!(with_ph(&trace, "X")[0]["args"].get("unfinished").is_none());
    }

    #[test]
    fn a_transaction_reused_without_release_closes_its_previous_use() {
        let trace = record(&Recorder::new(), || {
            debug!(name: "tx.initialize", tx = 1u64, direction = "to_device", length = 1u64);
            debug!(name: "tx.initialize", tx = 1u64, direction = "to_device", length = 2u64);
            debug!(name: "tx.release", tx = 1u64);
        });
        let ends = with_ph(&trace, "e");
        assert_eq!(with_ph(&trace, "b").len(), 2);
        assert_eq!(ends.len(), 2);
        assert_eq!(ends[0]["args"]["unfinished"], true);
        assert!(ends[1]["args"].get("unfinished").is_none());
    }

    #[test]
    fn a_completion_reported_after_the_next_program_dma_ends_the_older_transfer() {
        let trace = record(&Recorder::new(), || {
            debug!(name: "tx.initialize", tx = 1u64, direction = "to_device", length = 2u64);
            for transfer in 0..2u64 {
                debug_span!("tx.program_dma", tx = 1u64, transfer).in_scope(|| {});
            }
            debug!(name: "tx.completed", tx = 1u64, length = 1u64, finished = false, status = "success");
            debug!(name: "tx.completed", tx = 1u64, length = 1u64, finished = true, status = "success");
            debug!(name: "tx.release", tx = 1u64);
        });
        let ends: Vec<_> = with_ph(&trace, "e")
            .into_iter()
            .filter(|e| e["cat"] == "transfer")
            .collect();
        assert_eq!(ends[0]["id"], "1.0");
        assert_eq!(ends[0]["args"]["finished"], false);
        assert_eq!(ends[1]["id"], "1.1");
        assert_eq!(ends[1]["args"]["finished"], true);
    }

    #[test]
    fn threads_are_tracks_with_their_names() {
        let recorder = Recorder::new();
        let dispatch = recorder.dispatch();
        std::thread::scope(|s| {
            for name in ["device", "driver"] {
                let dispatch = dispatch.clone();
                std::thread::Builder::new()
                    .name(name.into())
                    .spawn_scoped(s, move || {
                        tracing::dispatcher::with_default(&dispatch, || {
                            debug_span!("interrupt.dpc").in_scope(
                                || tracing::event!(name: "device.line", tracing::Level::DEBUG, {}),
                            );
                        })
                    })
                    .unwrap();
            }
        });
        let trace: Value = serde_json::from_str(&recorder.finish()).unwrap();
        let mut names: Vec<(String, u64)> = with_ph(&trace, "M")
            .iter()
            .filter(|m| m["name"] == "thread_name")
            .map(|m| {
                (
                    m["args"]["name"].as_str().unwrap().to_owned(),
                    m["tid"].as_u64().unwrap(),
                )
            })
            .collect();
        names.sort();
        assert_eq!(names.len(), 2);
        assert_eq!(
            (names[0].0.as_str(), names[1].0.as_str()),
            ("device", "driver")
        );
        assert_ne!(names[0].1, names[1].1);
        for (_, tid) in names {
            assert_eq!(
                with_ph(&trace, "X")
                    .iter()
                    .filter(|e| e["tid"] == tid)
                    .count(),
                1
            );
        }
    }

    #[test]
    fn past_the_limit_events_are_counted_not_kept() {
        let recorder = Recorder::with_limit(10);
        let trace = record(&recorder, || {
            for i in 0..25u64 {
                debug!(name: "hal.map", tx = 1u64, bytes = i, elements = 1u64);
            }
        });
        assert_eq!(with_ph(&trace, "i").len(), 10);
        assert_eq!(trace["otherData"]["dropped_events"], 15);
        assert_eq!(trace["otherData"]["recorded_events"], 10);
        // finish starts over.
        assert_eq!(recorder.recorded(), 0);
        assert_eq!(recorder.dropped(), 0);
    }

    #[test]
    fn timestamps_are_microseconds_from_creation() {
        let recorder = Recorder::new();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let trace = record(
            &recorder,
            || tracing::event!(name: "device.line", tracing::Level::DEBUG, {}),
        );
        let ts = with_ph(&trace, "i")[0]["ts"].as_f64().unwrap();
        assert!(ts >= 2000.0, "{ts}");
        assert!(ts < 60_000_000.0, "{ts}");
    }
}
