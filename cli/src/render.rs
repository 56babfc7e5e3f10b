//! `dmatx trace render`: reads trace-event JSON (the recorder's, or any Chrome-format trace),
//! checks it, and draws an SVG timeline.
//!
//! The input is the object format (`{"traceEvents": [...]}`) or a bare array of events, as
//! Chrome accepts. [`parse`] validates what the drawing relies on and names the first problem
//! in one line: not JSON, no `traceEvents`, an event without `ph` or `ts`, an `"X"` without
//! `dur`, an async `"b"` without its `"e"` (or the reverse), a `"B"` without its `"E"`, an
//! unknown phase.
//!
//! The timeline ([`render_svg`]) has a time axis with labelled ticks and lanes in groups:
//! requests, transactions, transfers, device channels (the async categories of
//! `docs/TRACING.md`, then any other async category), then one group per thread with a lane per
//! span name (`program_dma`, `isr`, `dpc`, others) and a lane of instants. Overlapping slices
//! of a lane are stacked into rows. Slices are rectangles labelled when wide enough, with the
//! details in a tooltip (`<title>`); instants are ticks. A long trace is cut to a window: by
//! default the first stretch holding about [`DEFAULT_MAX_SLICES`] slices, said in the subtitle.

use crate::output::AtomicOutput;
use clap::{Args, Subcommand};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Slices shown by default when the trace is longer: the window is the first stretch of time
/// in which about this many slices begin.
pub const DEFAULT_MAX_SLICES: usize = 200;

/// `dmatx trace …`: work with trace-event JSON files.
#[derive(Args, Debug)]
pub struct TraceArgs {
    /// What to do with the trace.
    #[command(subcommand)]
    pub command: TraceCommand,
}

/// The `trace` subcommands.
#[derive(Subcommand, Debug)]
pub enum TraceCommand {
    /// Draw a trace-event JSON file (from `--trace`, or any Chrome/Perfetto JSON trace) as an
    /// SVG timeline.
    Render(RenderArgs),
}

/// `dmatx trace render FILE OUT.svg`.
#[derive(Args, Debug)]
pub struct RenderArgs {
    /// The trace: Chrome trace-event JSON, object format or a bare array of events.
    pub file: PathBuf,
    /// The SVG to write (atomically: on any error nothing is written).
    pub out: PathBuf,
    /// Start of the window, in trace microseconds (the JSON's `ts` values).
    #[arg(long, value_name = "US")]
    pub from_us: Option<f64>,
    /// End of the window, in trace microseconds.
    #[arg(long, value_name = "US")]
    pub to_us: Option<f64>,
    /// Without --from-us/--to-us: show the first stretch of the trace in which about this many
    /// slices begin.
    #[arg(long, alias = "max-events", value_name = "N", default_value_t = DEFAULT_MAX_SLICES)]
    pub max_slices: usize,
    /// Show the whole trace, however long.
    #[arg(long, conflicts_with_all = ["from_us", "to_us"])]
    pub all: bool,
    /// Width of the drawing in pixels (400 to 20000).
    #[arg(long, value_name = "PX", default_value_t = 1400)]
    pub width: u32,
}

/// Runs `dmatx trace …`.
///
/// # Errors
/// A one-line message: the input cannot be read or is not a valid trace, the options are
/// invalid, or the SVG cannot be written.
pub fn run(args: &TraceArgs) -> Result<(), String> {
    match &args.command {
        TraceCommand::Render(args) => render_command(args),
    }
}

fn render_command(args: &RenderArgs) -> Result<(), String> {
    let options = RenderOptions {
        from_us: args.from_us,
        to_us: args.to_us,
        max_slices: args.max_slices,
        all: args.all,
        width: args.width,
    };
    options.check()?;
    let out = AtomicOutput::prepare(&args.out)?;
    let text = std::fs::read_to_string(&args.file)
        .map_err(|e| format!("cannot read {}: {e}", args.file.display()))?;
    let trace = parse(&text).map_err(|e| format!("{}: {e}", args.file.display()))?;
    let name = args.file.file_name().map_or_else(
        || args.file.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let drawing = render_svg(&trace, &name, &options)?;
    out.write(drawing.svg.as_bytes())?;
    println!(
        "wrote {}: {} of {} slices and {} instants, {}",
        args.out.display(),
        drawing.slices_shown,
        trace.slices.len(),
        drawing.instants_shown,
        drawing.window_note,
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The model and the parser.

/// Where a slice is drawn.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Track {
    /// An async slice (`"b"`/`"e"`) of a category, with its id.
    Async {
        /// The category (`request`, `transaction`, `transfer`, `device`, …).
        cat: String,
        /// The id, as text.
        id: String,
    },
    /// A span (`"X"`, or `"B"`/`"E"`) on a thread.
    Thread {
        /// The process, as text.
        pid: String,
        /// The thread, as text.
        tid: String,
    },
}

/// A slice of time: an async slice or a span.
#[derive(Clone, Debug)]
pub struct Slice {
    /// Where it is drawn.
    pub track: Track,
    /// Its name.
    pub name: String,
    /// Start, in trace microseconds.
    pub start: f64,
    /// End, in trace microseconds (at least `start`).
    pub end: f64,
    /// Its `args` (of the begin for async slices), `Null` if none.
    pub args: Value,
}

/// An instant event (`"i"`, `"I"`, or an async instant `"n"`).
#[derive(Clone, Debug)]
pub struct Instant {
    /// The process, as text.
    pub pid: String,
    /// The thread, as text.
    pub tid: String,
    /// Its name.
    pub name: String,
    /// Its time, in trace microseconds.
    pub ts: f64,
}

/// A parsed and validated trace.
#[derive(Clone, Debug, Default)]
pub struct Trace {
    /// Async slices and spans, in the order their ends were read.
    pub slices: Vec<Slice>,
    /// Instants.
    pub instants: Vec<Instant>,
    /// Thread names by (pid, tid) from `thread_name` metadata.
    pub threads: BTreeMap<(String, String), String>,
    /// Entries of the `traceEvents` array (metadata included).
    pub events: usize,
    /// Events of phases the timeline does not draw (counters, flows, objects, samples).
    pub skipped: usize,
}

/// Text of an id or a pid/tid, which Chrome allows as numbers or strings.
fn id_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A begin not yet ended: its event index, time, name and args.
type Begun = (usize, f64, String, Value);

/// Parses and validates trace-event JSON.
///
/// # Errors
/// A one-line description of the first problem found, naming the event by its index in
/// `traceEvents` (and its phase and name when it has them).
pub fn parse(text: &str) -> Result<Trace, String> {
    let root: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    // Taken apart by value: the events' `args` move into the slices instead of being copied.
    let events = match root {
        Value::Array(events) => events,
        Value::Object(mut map) => match map.remove("traceEvents") {
            Some(Value::Array(events)) => events,
            Some(other) => {
                return Err(format!(
                    "\"traceEvents\" is {}, not an array of events",
                    kind_of(&other)
                ));
            }
            None => {
                return Err(
                    "no \"traceEvents\": expected {\"traceEvents\": [...]} or an array of events"
                        .into(),
                );
            }
        },
        other => {
            return Err(format!(
                "expected an object with \"traceEvents\" or an array of events, found {}",
                kind_of(&other)
            ));
        }
    };

    let mut trace = Trace {
        events: events.len(),
        ..Trace::default()
    };
    // Open async slices by (category, id): a stack, since equal ids nest.
    let mut open: HashMap<(String, String), Vec<Begun>> = HashMap::new();
    // Open "B" spans per (pid, tid).
    let mut stacks: HashMap<(String, String), Vec<Begun>> = HashMap::new();
    for (i, event) in events.into_iter().enumerate() {
        let mut e = match event {
            Value::Object(e) => e,
            other => {
                return Err(format!(
                    "event {i}: {} is not an event object",
                    kind_of(&other)
                ));
            }
        };
        let args = e.remove("args").unwrap_or(Value::Null);
        let ph = match e.get("ph") {
            Some(Value::String(ph)) => ph.as_str(),
            Some(other) => {
                return Err(format!(
                    "event {i}: \"ph\" is {}, not a string",
                    kind_of(other)
                ));
            }
            None => return Err(format!("event {i}: no \"ph\" (phase)")),
        };
        let name = match e.get("name") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None => String::new(),
            Some(other) => {
                return Err(format!(
                    "event {i} (ph \"{ph}\"): \"name\" is {}, not a string",
                    kind_of(other)
                ));
            }
        };
        let what = if name.is_empty() {
            format!("event {i} (ph \"{ph}\")")
        } else {
            format!("event {i} (ph \"{ph}\", \"{name}\")")
        };
        let pid = e.get("pid").and_then(id_text).unwrap_or_default();
        let tid = e.get("tid").and_then(id_text).unwrap_or_default();
        if ph == "M" {
            if name == "thread_name"
                && let Some(n) = args.get("name").and_then(Value::as_str)
            {
                trace.threads.insert((pid, tid), n.to_owned());
            }
            continue;
        }
        let ts = match e.get("ts") {
            Some(Value::Number(n)) => n.as_f64().filter(|t| t.is_finite()),
            Some(Value::String(s)) => s.parse::<f64>().ok().filter(|t| t.is_finite()),
            Some(other) => {
                return Err(format!(
                    "{what}: \"ts\" is {}, not a number",
                    kind_of(other)
                ));
            }
            None => return Err(format!("{what}: no \"ts\" (timestamp)")),
        };
        let Some(ts) = ts else {
            return Err(format!("{what}: \"ts\" is not a finite number"));
        };
        match ph {
            "X" => {
                let dur = match e.get("dur") {
                    Some(Value::Number(n)) => n.as_f64().unwrap_or(f64::NAN),
                    Some(other) => {
                        return Err(format!(
                            "{what}: \"dur\" is {}, not a number",
                            kind_of(other)
                        ));
                    }
                    None => return Err(format!("{what}: a complete event without \"dur\"")),
                };
                if !(dur >= 0.0 && dur.is_finite()) {
                    return Err(format!("{what}: \"dur\" {dur} is negative or not finite"));
                }
                trace.slices.push(Slice {
                    track: Track::Thread { pid, tid },
                    name,
                    start: ts,
                    end: ts + dur,
                    args,
                });
            }
            "B" => stacks
                .entry((pid, tid))
                .or_default()
                .push((i, ts, name, args)),
            "E" => {
                let Some((_, start, begun_name, begin_args)) = stacks
                    .get_mut(&(pid.clone(), tid.clone()))
                    .and_then(Vec::pop)
                else {
                    return Err(format!(
                        "{what}: an end \"E\" on thread {tid} with no \"B\" open"
                    ));
                };
                if ts < start {
                    return Err(format!(
                        "{what}: ends at {ts} µs, before its \"B\" at {start} µs"
                    ));
                }
                trace.slices.push(Slice {
                    track: Track::Thread { pid, tid },
                    name: begun_name,
                    start,
                    end: ts,
                    args: begin_args,
                });
            }
            "b" | "e" | "n" => {
                let id = e
                    .get("id")
                    .and_then(id_text)
                    .or_else(|| {
                        let id2 = e.get("id2")?;
                        id2.get("local")
                            .or_else(|| id2.get("global"))
                            .and_then(id_text)
                    })
                    .ok_or_else(|| format!("{what}: an async event without \"id\""))?;
                let cat = e
                    .get("cat")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned();
                match ph {
                    "b" => open.entry((cat, id)).or_default().push((i, ts, name, args)),
                    "e" => {
                        let Some((_, start, begun_name, begin_args)) =
                            open.get_mut(&(cat.clone(), id.clone())).and_then(Vec::pop)
                        else {
                            return Err(format!(
                                "{what}: an async end \"e\" (cat \"{cat}\", id {id}) with no \"b\""
                            ));
                        };
                        if ts < start {
                            return Err(format!(
                                "{what}: ends at {ts} µs, before its \"b\" at {start} µs"
                            ));
                        }
                        let name = if begun_name.is_empty() {
                            name
                        } else {
                            begun_name
                        };
                        trace.slices.push(Slice {
                            track: Track::Async { cat, id },
                            name,
                            start,
                            end: ts,
                            args: begin_args,
                        });
                    }
                    _ => trace.instants.push(Instant { pid, tid, name, ts }),
                }
            }
            "i" | "I" => trace.instants.push(Instant { pid, tid, name, ts }),
            // Counters, flows, objects, samples, marks, clock syncs, contexts: valid, not drawn.
            "C" | "s" | "t" | "f" | "N" | "O" | "D" | "P" | "R" | "c" | "(" | ")" | "S" | "T"
            | "F" | "p" => trace.skipped += 1,
            other => return Err(format!("event {i}: unknown phase \"{other}\"")),
        }
    }
    let mut unclosed: Vec<(usize, String)> = Vec::new();
    for ((cat, id), stack) in open {
        for (i, ts, name, _) in stack {
            unclosed.push((
                i,
                format!("event {i}: async slice \"{name}\" (cat \"{cat}\", id {id}) begun at {ts} µs has no end \"e\""),
            ));
        }
    }
    for ((_, tid), stack) in stacks {
        for (i, ts, name, _) in stack {
            unclosed.push((
                i,
                format!("event {i}: span \"{name}\" begun (\"B\") on thread {tid} at {ts} µs has no end \"E\""),
            ));
        }
    }
    if let Some((_, message)) = unclosed.into_iter().min_by_key(|u| u.0) {
        return Err(message);
    }
    Ok(trace)
}

// ---------------------------------------------------------------------------------------------
// Drawing.

/// How to draw a trace.
#[derive(Clone, Debug)]
pub struct RenderOptions {
    /// Start of the window (trace µs); default the trace's start.
    pub from_us: Option<f64>,
    /// End of the window (trace µs); default the trace's end, or see `max_slices`.
    pub to_us: Option<f64>,
    /// Without a window: show the first stretch in which about this many slices begin.
    pub max_slices: usize,
    /// Show everything.
    pub all: bool,
    /// Width in pixels.
    pub width: u32,
}

impl Default for RenderOptions {
    fn default() -> Self {
        Self {
            from_us: None,
            to_us: None,
            max_slices: DEFAULT_MAX_SLICES,
            all: false,
            width: 1400,
        }
    }
}

impl RenderOptions {
    /// Checks the options on their own.
    ///
    /// # Errors
    /// A one-line message naming the bad option.
    pub fn check(&self) -> Result<(), String> {
        for (name, v) in [("--from-us", self.from_us), ("--to-us", self.to_us)] {
            if v.is_some_and(|v| !v.is_finite()) {
                return Err(format!("{name} must be a finite number of microseconds"));
            }
        }
        if let (Some(from), Some(to)) = (self.from_us, self.to_us)
            && from >= to
        {
            return Err(format!(
                "--from-us ({from}) must be less than --to-us ({to})"
            ));
        }
        if self.max_slices == 0 {
            return Err("--max-slices must be at least 1".into());
        }
        if !(400..=20_000).contains(&self.width) {
            return Err(format!(
                "--width {} is outside 400 to 20000 pixels",
                self.width
            ));
        }
        Ok(())
    }
}

/// An SVG drawing and what it shows.
#[derive(Clone, Debug)]
pub struct Drawing {
    /// The SVG text.
    pub svg: String,
    /// Slices drawn (those overlapping the window).
    pub slices_shown: usize,
    /// Instants drawn.
    pub instants_shown: usize,
    /// Which window is shown, in words.
    pub window_note: String,
}

const ROW: f64 = 18.0;
const HEADER: f64 = 20.0;
const LEFT: f64 = 190.0;
const RIGHT: f64 = 24.0;
const TOP: f64 = 84.0;
/// Rows of one lane before further overlapping slices are drawn over the last row.
const MAX_ROWS: usize = 12;
/// Lanes of one async category keyed by id, at most; more ids are packed into rows instead.
const MAX_ID_LANES: usize = 8;

/// Well-known async categories, in drawing order, with the group title and the lane prefix.
const CATEGORIES: [(&str, &str, &str, &str); 4] = [
    ("request", "requests", "request", "#4e79a7"),
    ("transaction", "transactions", "tx", "#f28e2b"),
    ("transfer", "transfers", "transfer", "#59a14f"),
    ("device", "device channels", "channel", "#e15759"),
];

/// Well-known spans, in lane order, with the lane name and colour.
const SPANS: [(&str, &str, &str); 3] = [
    ("tx.program_dma", "program_dma", "#76b7b2"),
    ("interrupt.isr", "isr", "#edc948"),
    ("interrupt.dpc", "dpc", "#b07aa1"),
];
const OTHER_ASYNC: &str = "#bab0ac";
const OTHER_SPAN: &str = "#9c755f";

/// Instants by name prefix: colour and legend text.
const INSTANTS: [(&str, &str, &str); 5] = [
    ("tx.", "#d9590b", "tx.* events"),
    ("hal.", "#6b6b6b", "hal.* events"),
    ("request.", "#2f5d8a", "request.* events"),
    ("device.", "#c0392b", "device.* events"),
    ("interrupt.", "#9a7d0a", "interrupt.* events"),
];
const OTHER_INSTANT: &str = "#222222";

fn instant_colour(name: &str) -> (&'static str, &'static str) {
    INSTANTS
        .iter()
        .find(|(p, _, _)| name.starts_with(p))
        .map_or((OTHER_INSTANT, "other events"), |&(_, c, l)| (c, l))
}

/// Escapes text for XML content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Characters XML 1.0 does not allow at all.
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

/// A "nice" step (1, 2 or 5 × 10^k) near `raw`.
pub(crate) fn nice_step(raw: f64) -> f64 {
    if !(raw > 0.0 && raw.is_finite()) {
        return 1.0;
    }
    let exp = raw.log10().floor();
    let base = 10f64.powf(exp);
    let m = raw / base;
    let nice = if m <= 1.0 {
        1.0
    } else if m <= 2.0 {
        2.0
    } else if m <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * base
}

/// A time in µs, in the unit that suits a span of `scale` µs.
fn format_time(us: f64, scale: f64) -> String {
    let (value, unit, step) = if scale >= 1e6 {
        (us / 1e6, "s", scale / 1e6)
    } else if scale >= 1e3 {
        (us / 1e3, "ms", scale / 1e3)
    } else {
        (us, "µs", scale)
    };
    let decimals = if step >= 10.0 {
        0
    } else {
        ((-step.log10()).ceil() as i32 + 1).clamp(0, 6) as usize
    };
    let text = format!("{value:.decimals$}");
    let text = if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        text
    };
    let text = if text == "-0" { "0".to_owned() } else { text };
    format!("{text} {unit}")
}

/// A duration in µs in its own best unit.
fn format_duration(us: f64) -> String {
    format_time(us, us.abs().max(1e-3) / 10.0 * 10.0)
}

/// Width of `text` at `size` px, estimated (a proportional font's average advance is well under
/// 0.62 em, so labels judged to fit do).
fn text_width(text: &str, size: f64) -> f64 {
    text.chars().count() as f64 * size * 0.62
}

/// `text` cut (with an ellipsis) to fit `width` px at `size` px, or None if not even a few
/// characters fit.
fn fit(text: &str, width: f64, size: f64) -> Option<String> {
    if text_width(text, size) <= width {
        return Some(text.to_owned());
    }
    let chars = (width / (size * 0.62)).floor() as usize;
    if chars < 4 {
        return None;
    }
    let mut cut: String = text.chars().take(chars - 1).collect();
    cut.push('…');
    Some(cut)
}

/// Black or white text on a fill `#rrggbb`.
fn text_colour(fill: &str) -> &'static str {
    let channel = |i: usize| u8::from_str_radix(&fill[i..i + 2], 16).unwrap_or(0) as f64;
    let luminance = 0.299 * channel(1) + 0.587 * channel(3) + 0.114 * channel(5);
    if luminance > 150.0 {
        "#1a1a1a"
    } else {
        "#ffffff"
    }
}

/// A lane: a label and rows of slices (indices into the trace's slices).
struct Lane {
    label: String,
    colour: &'static str,
    rows: Vec<Vec<usize>>,
    instants: Vec<usize>,
}

struct Group {
    title: String,
    lanes: Vec<Lane>,
}

/// "1 slice", "12 slices".
fn by_count(n: usize) -> String {
    format!("{n} slice{}", if n == 1 { "" } else { "s" })
}

/// Packs slices (sorted by start) into rows without overlap.
fn pack(slices: &[Slice], mut indices: Vec<usize>) -> Vec<Vec<usize>> {
    indices.sort_by(|&a, &b| slices[a].start.total_cmp(&slices[b].start));
    let mut rows: Vec<Vec<usize>> = Vec::new();
    let mut ends: Vec<f64> = Vec::new();
    for i in indices {
        let s = &slices[i];
        let row = ends.iter().position(|&end| end <= s.start);
        let row = match row {
            Some(r) => r,
            None if rows.len() < MAX_ROWS => {
                rows.push(Vec::new());
                ends.push(f64::NEG_INFINITY);
                rows.len() - 1
            }
            None => rows.len() - 1,
        };
        rows[row].push(i);
        ends[row] = ends[row].max(s.end);
    }
    rows
}

/// The label drawn in a slice.
fn slice_label(slice: &Slice) -> String {
    let short = SPANS
        .iter()
        .find(|(n, _, _)| *n == slice.name)
        .map(|(_, short, _)| *short);
    match (short, slice.args.get("tx").and_then(Value::as_u64)) {
        (Some("program_dma"), Some(tx)) => match slice.args.get("transfer").and_then(Value::as_u64)
        {
            Some(n) => format!("tx {tx} #{n}"),
            None => format!("tx {tx}"),
        },
        (Some(short), _) => short.to_owned(),
        (None, _) if slice.name.is_empty() => "(unnamed)".to_owned(),
        (None, _) => slice.name.clone(),
    }
}

/// The tooltip of a slice: name, times and arguments.
fn slice_tooltip(slice: &Slice, scale: f64) -> String {
    let mut text = format!(
        "{}: {} + {}",
        if slice.name.is_empty() {
            "(unnamed)"
        } else {
            &slice.name
        },
        format_time(slice.start, scale),
        format_duration(slice.end - slice.start)
    );
    if let Value::Object(args) = &slice.args {
        for (k, v) in args.iter().take(12) {
            let v = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let _ = write!(text, "\n{k} = {v}");
        }
    }
    text
}

/// Chooses the window: (from, to, note about it).
fn window(trace: &Trace, options: &RenderOptions) -> (f64, f64, String) {
    let starts = trace
        .slices
        .iter()
        .map(|s| s.start)
        .chain(trace.instants.iter().map(|i| i.ts));
    let ends = trace
        .slices
        .iter()
        .map(|s| s.end)
        .chain(trace.instants.iter().map(|i| i.ts));
    let t_min = starts.fold(f64::INFINITY, f64::min);
    let t_max = ends.fold(f64::NEG_INFINITY, f64::max);
    if !t_min.is_finite() {
        return (0.0, 1.0, "an empty trace".into());
    }
    let whole = format!(
        "{} to {}",
        format_time(t_min, t_max - t_min),
        format_time(t_max, t_max - t_min)
    );
    if options.from_us.is_some() || options.to_us.is_some() {
        let from = options.from_us.unwrap_or(t_min);
        let to = options.to_us.unwrap_or(t_max).max(from + 1e-3);
        let scale = to - from;
        return (
            from,
            to,
            format!(
                "{} to {} of {whole}",
                format_time(from, scale),
                format_time(to, scale)
            ),
        );
    }
    let (from, to) = pad(t_min, t_max);
    if options.all || trace.slices.len() <= options.max_slices {
        return (from, to, format!("the whole trace, {whole}"));
    }
    let mut starts: Vec<f64> = trace.slices.iter().map(|s| s.start).collect();
    starts.sort_by(f64::total_cmp);
    // The end is where the next slice after the first `max_slices` begins.
    let cut = starts[options.max_slices];
    let cut = if cut > t_min {
        cut
    } else {
        starts.iter().copied().find(|&s| s > t_min).unwrap_or(t_max)
    };
    let scale = cut - t_min;
    (
        from.min(t_min),
        cut,
        format!(
            "the first {} of {} ({whole}); --from-us/--to-us or --all for more",
            format_duration(scale),
            format_duration(t_max - t_min),
        ),
    )
}

/// The whole trace's bounds with a little room, and a non-empty width.
fn pad(t_min: f64, t_max: f64) -> (f64, f64) {
    if t_max > t_min {
        (t_min, t_max + (t_max - t_min) * 0.01)
    } else {
        (t_min - 0.5, t_min + 0.5)
    }
}

/// Draws `trace` as an SVG timeline; `name` (the file's name) goes in the title.
///
/// # Errors
/// A one-line message if the options are invalid.
pub fn render_svg(trace: &Trace, name: &str, options: &RenderOptions) -> Result<Drawing, String> {
    options.check()?;
    let (from, to, note) = window(trace, options);
    let span = to - from;
    let visible = |s: &Slice| s.end >= from && s.start <= to;
    let width = f64::from(options.width);
    let plot_width = width - LEFT - RIGHT;
    let x = |t: f64| LEFT + (t - from) / span * plot_width;

    // Lanes.
    let mut groups: Vec<Group> = Vec::new();
    let mut by_cat: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    let mut by_thread: BTreeMap<(&str, &str), BTreeMap<&str, Vec<usize>>> = BTreeMap::new();
    let mut shown = 0;
    for (i, s) in trace.slices.iter().enumerate() {
        if !visible(s) {
            continue;
        }
        shown += 1;
        match &s.track {
            Track::Async { cat, .. } => by_cat.entry(cat).or_default().push(i),
            Track::Thread { pid, tid } => by_thread
                .entry((pid, tid))
                .or_default()
                .entry(&s.name)
                .or_default()
                .push(i),
        }
    }
    let mut instants_by_thread: BTreeMap<(&str, &str), Vec<usize>> = BTreeMap::new();
    for (i, e) in trace.instants.iter().enumerate() {
        if e.ts >= from && e.ts <= to {
            instants_by_thread
                .entry((&e.pid, &e.tid))
                .or_default()
                .push(i);
        }
    }
    let instants_shown = instants_by_thread.values().map(Vec::len).sum();
    let known: Vec<&str> = CATEGORIES.iter().map(|c| c.0).collect();
    let mut cats: Vec<&str> = by_cat.keys().copied().collect();
    cats.sort_by_key(|c| (known.iter().position(|k| k == c).unwrap_or(known.len()), *c));
    let mut legend: Vec<(String, &'static str, bool)> = Vec::new();
    for cat in cats {
        let indices = by_cat.remove(cat).unwrap_or_default();
        let count = indices.len();
        let (title, prefix, colour) = CATEGORIES
            .iter()
            .find(|c| c.0 == cat)
            .map_or((cat, cat, OTHER_ASYNC), |c| (c.1, c.2, c.3));
        let title = if title.is_empty() {
            "async (no category)"
        } else {
            title
        };
        legend.push((title.to_owned(), colour, false));
        let mut ids: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for &i in &indices {
            if let Track::Async { id, .. } = &trace.slices[i].track {
                ids.entry(id).or_default().push(i);
            }
        }
        let one_lane_per_id = ids.len() <= MAX_ID_LANES
            && ids
                .values()
                .all(|v| pack(&trace.slices, v.clone()).len() == 1);
        let lanes = if one_lane_per_id {
            let mut ids: Vec<_> = ids.into_iter().collect();
            ids.sort_by(|a, b| match (a.0.parse::<f64>(), b.0.parse::<f64>()) {
                (Ok(x), Ok(y)) => x.total_cmp(&y),
                _ => a.0.cmp(b.0),
            });
            ids.into_iter()
                .map(|(id, v)| Lane {
                    // The slices' own name when they share one (`tx 3`, `tx 3 #0`).
                    label: match trace.slices[v[0]].name.as_str() {
                        name if !name.is_empty()
                            && v.iter().all(|&i| trace.slices[i].name == name) =>
                        {
                            name.to_owned()
                        }
                        _ => format!("{prefix} {id}"),
                    },
                    colour,
                    rows: pack(&trace.slices, v),
                    instants: Vec::new(),
                })
                .collect()
        } else {
            let rows = pack(&trace.slices, indices);
            let n = rows.len();
            vec![Lane {
                label: if n == 1 {
                    "all".to_owned()
                } else {
                    format!("{n} rows")
                },
                colour,
                rows,
                instants: Vec::new(),
            }]
        };
        groups.push(Group {
            title: format!("{title} ({})", by_count(count)),
            lanes,
        });
    }
    let mut thread_keys: Vec<(&str, &str)> = by_thread
        .keys()
        .chain(instants_by_thread.keys())
        .copied()
        .collect();
    thread_keys.sort_by(|a, b| {
        let num = |s: &str| s.parse::<f64>().unwrap_or(f64::INFINITY);
        (num(a.0), num(a.1), a)
            .partial_cmp(&(num(b.0), num(b.1), b))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    thread_keys.dedup();
    let mut span_legend: Vec<(String, &'static str, bool)> = Vec::new();
    for key in thread_keys {
        let mut lanes = Vec::new();
        let mut spans = by_thread.remove(&key).unwrap_or_default();
        for (full, short, colour) in SPANS {
            if let Some(v) = spans.remove(full) {
                lanes.push(Lane {
                    label: short.to_owned(),
                    colour,
                    rows: pack(&trace.slices, v),
                    instants: Vec::new(),
                });
                if !span_legend.iter().any(|l| l.0 == short) {
                    span_legend.push((short.to_owned(), colour, false));
                }
            }
        }
        for (name, v) in spans {
            lanes.push(Lane {
                label: if name.is_empty() {
                    "(unnamed)".into()
                } else {
                    name.to_owned()
                },
                colour: OTHER_SPAN,
                rows: pack(&trace.slices, v),
                instants: Vec::new(),
            });
            if !span_legend.iter().any(|l| l.0 == "other spans") {
                span_legend.push(("other spans".into(), OTHER_SPAN, false));
            }
        }
        if let Some(v) = instants_by_thread.remove(&key) {
            lanes.push(Lane {
                label: "events".into(),
                colour: OTHER_INSTANT,
                rows: vec![Vec::new()],
                instants: v,
            });
        }
        let thread = trace
            .threads
            .get(&(key.0.to_owned(), key.1.to_owned()))
            .map_or_else(
                || format!("thread {}", key.1),
                |n| format!("thread {n} ({})", key.1),
            );
        groups.push(Group {
            title: thread,
            lanes,
        });
    }
    legend.extend(span_legend);
    let mut instant_legend: Vec<(&'static str, &'static str)> = Vec::new();
    for lane in groups.iter().flat_map(|g| &g.lanes) {
        for &i in &lane.instants {
            let (c, l) = instant_colour(&trace.instants[i].name);
            if !instant_legend.contains(&(l, c)) {
                instant_legend.push((l, c));
            }
        }
    }
    instant_legend.sort_by_key(|&(l, _)| {
        INSTANTS
            .iter()
            .position(|i| i.2 == l)
            .unwrap_or(INSTANTS.len())
    });
    legend.extend(
        instant_legend
            .into_iter()
            .map(|(l, c)| (l.to_owned(), c, true)),
    );

    // Layout.
    let lanes_height: f64 = groups
        .iter()
        .map(|g| {
            HEADER
                + g.lanes
                    .iter()
                    .map(|l| l.rows.len().max(1) as f64 * ROW)
                    .sum::<f64>()
        })
        .sum();
    let lanes_bottom = TOP + lanes_height.max(ROW);
    let legend_top = lanes_bottom + 34.0;
    let mut legend_rows = 1.0;
    {
        let mut lx = LEFT;
        for (label, _, _) in &legend {
            let w = 26.0 + text_width(label, 11.0) + 18.0;
            if lx + w > width - RIGHT && lx > LEFT {
                legend_rows += 1.0;
                lx = LEFT;
            }
            lx += w;
        }
    }
    let height = (legend_top + legend_rows * 18.0 + 12.0).ceil();

    let mut svg = String::with_capacity(64 * 1024 + shown * 300 + instants_shown * 150);
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="Helvetica, Arial, sans-serif" font-size="11">"#,
        w = options.width,
        h = height
    );
    let _ = writeln!(
        svg,
        r##"<rect x="0" y="0" width="{}" height="{height}" fill="#ffffff"/>"##,
        options.width
    );
    let _ = writeln!(
        svg,
        r#"<text x="12" y="24" font-size="16" font-weight="bold">{}</text>"#,
        escape(&format!("dmatx trace — {name} — {} events", trace.events))
    );
    let _ = writeln!(
        svg,
        r##"<text x="12" y="43" font-size="12" fill="#555555">{}</text>"##,
        escape(&format!(
            "{shown} of {} slices and {instants_shown} instants: {note}",
            trace.slices.len()
        ))
    );

    // Axis and grid.
    let step = nice_step(span / (plot_width / 110.0).max(2.0));
    let first = (from / step).ceil() * step;
    let axis_y = TOP - 14.0;
    let _ = writeln!(
        svg,
        r##"<line x1="{LEFT}" y1="{axis_y}" x2="{:.1}" y2="{axis_y}" stroke="#888888"/>"##,
        width - RIGHT
    );
    let mut ticks = String::new();
    let mut t = first;
    let mut n = 0;
    while t <= to + step * 1e-9 && n < 1000 {
        let px = x(t);
        let label = escape(&format_time(t, step * 10.0));
        let _ = writeln!(
            ticks,
            r##"<line x1="{px:.1}" y1="{:.1}" x2="{px:.1}" y2="{lanes_bottom:.1}" stroke="#e3e3e3"/><line x1="{px:.1}" y1="{:.1}" x2="{px:.1}" y2="{axis_y}" stroke="#888888"/><text x="{px:.1}" y="{:.1}" text-anchor="middle" fill="#333333">{label}</text><text x="{px:.1}" y="{:.1}" text-anchor="middle" fill="#333333">{label}</text>"##,
            axis_y,
            axis_y - 4.0,
            axis_y - 7.0,
            lanes_bottom + 14.0,
        );
        n += 1;
        t = first + step * n as f64;
    }

    // Lane backgrounds and labels first, grid over them, slices on top.
    let mut backgrounds = String::new();
    let mut content = String::new();
    let mut y = TOP;
    let mut stripe = false;
    for group in &groups {
        let _ = writeln!(
            backgrounds,
            r##"<rect x="0" y="{y:.1}" width="{}" height="{HEADER}" fill="#e9edf2"/><text x="8" y="{:.1}" font-weight="bold" fill="#222222">{}</text>"##,
            options.width,
            y + 14.0,
            escape(&group.title)
        );
        y += HEADER;
        for lane in &group.lanes {
            let h = lane.rows.len().max(1) as f64 * ROW;
            stripe = !stripe;
            let fill = if stripe { "#ffffff" } else { "#f6f6f6" };
            let _ = writeln!(
                backgrounds,
                r##"<rect x="0" y="{y:.1}" width="{}" height="{h:.1}" fill="{fill}"/><text x="20" y="{:.1}" fill="#333333">{}</text>"##,
                options.width,
                y + 13.0,
                escape(fit(&lane.label, LEFT - 28.0, 11.0).as_deref().unwrap_or(""))
            );
            for (r, row) in lane.rows.iter().enumerate() {
                let ry = y + r as f64 * ROW;
                for &i in row {
                    let s = &trace.slices[i];
                    let x0 = x(s.start.max(from));
                    let x1 = x(s.end.min(to));
                    let w = (x1 - x0).max(1.0);
                    let _ = write!(
                        content,
                        r##"<g><title>{}</title><rect x="{x0:.1}" y="{:.1}" width="{w:.1}" height="{:.1}" rx="2" fill="{}" stroke="#00000040" stroke-width="0.6"/>"##,
                        escape(&slice_tooltip(s, span)),
                        ry + 2.0,
                        ROW - 4.0,
                        lane.colour
                    );
                    if let Some(label) = fit(&slice_label(s), w - 6.0, 10.0) {
                        let _ = write!(
                            content,
                            r#"<text x="{:.1}" y="{:.1}" font-size="10" fill="{}">{}</text>"#,
                            x0 + 3.0,
                            ry + 12.5,
                            text_colour(lane.colour),
                            escape(&label)
                        );
                    }
                    content.push_str("</g>\n");
                }
            }
            for &i in &lane.instants {
                let e = &trace.instants[i];
                let px = x(e.ts);
                let (colour, _) = instant_colour(&e.name);
                let _ = writeln!(
                    content,
                    r#"<line x1="{px:.1}" y1="{:.1}" x2="{px:.1}" y2="{:.1}" stroke="{colour}" stroke-width="1.2"><title>{}</title></line>"#,
                    y + 3.0,
                    y + ROW - 3.0,
                    escape(&format!("{} at {}", e.name, format_time(e.ts, span)))
                );
            }
            y += h;
        }
    }
    if groups.is_empty() {
        let _ = writeln!(
            content,
            r##"<text x="{LEFT}" y="{:.1}" fill="#777777">(nothing in this window)</text>"##,
            TOP + 13.0
        );
    }
    svg.push_str(&backgrounds);
    svg.push_str(&ticks);
    let _ = writeln!(
        svg,
        r##"<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{lanes_bottom:.1}" stroke="#bbbbbb"/>"##
    );
    svg.push_str(&content);

    // Legend.
    let mut lx = LEFT;
    let mut ly = legend_top;
    let _ = writeln!(
        svg,
        r##"<text x="12" y="{:.1}" font-weight="bold" fill="#222222">legend</text>"##,
        ly + 11.0
    );
    for (label, colour, tick) in &legend {
        let w = 26.0 + text_width(label, 11.0) + 18.0;
        if lx + w > width - RIGHT && lx > LEFT {
            lx = LEFT;
            ly += 18.0;
        }
        if *tick {
            let _ = write!(
                svg,
                r#"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{colour}" stroke-width="2"/>"#,
                lx + 9.0,
                ly,
                lx + 9.0,
                ly + 13.0
            );
        } else {
            let _ = write!(
                svg,
                r##"<rect x="{lx:.1}" y="{:.1}" width="18" height="12" rx="2" fill="{colour}" stroke="#00000040"/>"##,
                ly + 1.0
            );
        }
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" fill="#333333">{}</text>"##,
            lx + 24.0,
            ly + 11.0,
            escape(label)
        );
        lx += w;
    }
    svg.push_str("</svg>\n");
    Ok(Drawing {
        svg,
        slices_shown: shown,
        instants_shown,
        window_note: note,
    })
}

/// A short check that `svg` is well-formed XML as far as this module writes it: balanced tags,
/// quoted attributes, known entities. Used by the tests here and of the plot.
#[cfg(test)]
pub(crate) fn check_well_formed(svg: &str) -> Result<(), String> {
    let mut stack: Vec<String> = Vec::new();
    let mut rest = svg;
    let check_text = |t: &str| -> Result<(), String> {
        let mut s = t;
        while let Some(p) = s.find('&') {
            let after = &s[p + 1..];
            let end = after.find(';').ok_or("an & without ;")?;
            let entity = &after[..end];
            if !matches!(entity, "amp" | "lt" | "gt" | "quot" | "apos") {
                return Err(format!("unknown entity &{entity};"));
            }
            s = &after[end + 1..];
        }
        if t.contains('>') {
            return Err(format!("a raw > in text {t:?}"));
        }
        Ok(())
    };
    while let Some(open) = rest.find('<') {
        check_text(&rest[..open])?;
        let close = rest[open..].find('>').ok_or("a < without >")? + open;
        let tag = &rest[open + 1..close];
        rest = &rest[close + 1..];
        if let Some(name) = tag.strip_prefix('/') {
            let top = stack
                .pop()
                .ok_or_else(|| format!("</{name}> closes nothing"))?;
            if top != name {
                return Err(format!("</{name}> closes <{top}>"));
            }
            continue;
        }
        let self_closing = tag.ends_with('/');
        let body = tag.trim_end_matches('/');
        let name: String = body.chars().take_while(|c| !c.is_whitespace()).collect();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == ':' || c == '-')
        {
            return Err(format!("bad tag <{tag}>"));
        }
        // Attributes: name="value" pairs.
        let mut attrs = body[name.len()..].trim();
        while !attrs.is_empty() {
            let eq = attrs
                .find("=\"")
                .ok_or_else(|| format!("unquoted attribute in <{tag}>"))?;
            let value_end = attrs[eq + 2..].find('"').ok_or("unterminated attribute")? + eq + 2;
            check_text(&attrs[eq + 2..value_end])?;
            if attrs[eq + 2..value_end].contains('<') {
                return Err("< in an attribute".into());
            }
            attrs = attrs[value_end + 1..].trim_start();
        }
        if !self_closing {
            stack.push(name);
        }
    }
    check_text(rest)?;
    if let Some(top) = stack.pop() {
        return Err(format!("<{top}> is never closed"));
    }
    Ok(())
}

/// Writes `svg` for `trace` into `path` (used by callers that hold a parsed trace).
///
/// # Errors
/// A one-line message if the options are invalid or the file cannot be written.
pub fn write_svg(
    trace: &Trace,
    name: &str,
    options: &RenderOptions,
    path: &Path,
) -> Result<Drawing, String> {
    let out = AtomicOutput::prepare(path)?;
    let drawing = render_svg(trace, name, options)?;
    out.write(drawing.svg.as_bytes())?;
    Ok(drawing)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(text: &str) -> String {
        parse(text).expect_err("must be rejected")
    }

    #[test]
    fn malformed_inputs_are_one_line_errors_that_say_what_is_wrong() {
        let cases: [(&str, &str); 16] = [
            ("{not json", "not JSON"),
            ("", "not JSON"),
            ("42", "found a number"),
            (r#"{"events": []}"#, "no \"traceEvents\""),
            (r#"{"traceEvents": {}}"#, "is an object, not an array"),
            (r#"[1]"#, "event 0: a number is not an event object"),
            (r#"[{"ts": 1}]"#, "event 0: no \"ph\""),
            (r#"[{"ph": 5, "ts": 1}]"#, "\"ph\" is a number"),
            (
                r#"[{"ph": "i", "name": "x"}]"#,
                "event 0 (ph \"i\", \"x\"): no \"ts\"",
            ),
            (r#"[{"ph": "i", "ts": "soon"}]"#, "not a finite number"),
            (r#"[{"ph": "X", "ts": 1}]"#, "without \"dur\""),
            (r#"[{"ph": "X", "ts": 1, "dur": -2}]"#, "negative"),
            (
                r#"[{"ph": "b", "ts": 1, "cat": "request", "id": 3, "name": "r"}]"#,
                "event 0: async slice \"r\" (cat \"request\", id 3) begun at 1 µs has no end",
            ),
            (
                r#"[{"ph": "e", "ts": 1, "cat": "c", "id": "7"}]"#,
                "with no \"b\"",
            ),
            (r#"[{"ph": "b", "ts": 1, "cat": "c"}]"#, "without \"id\""),
            (r#"[{"ph": "Q", "ts": 1}]"#, "unknown phase \"Q\""),
        ];
        for (input, expected) in cases {
            let e = err(input);
            assert!(e.contains(expected), "{input}: {e:?} lacks {expected:?}");
            assert!(!e.contains('\n'), "{input}: {e:?}");
        }
        let e = err(r#"[{"ph": "B", "ts": 1, "tid": 2, "name": "s"}]"#);
        assert!(e.contains("has no end \"E\""), "{e}");
        let e = err(r#"[{"ph": "E", "ts": 1, "tid": 2}]"#);
        assert!(e.contains("no \"B\" open"), "{e}");
        let e = err(
            r#"[{"ph": "b", "ts": 5, "cat": "c", "id": 1}, {"ph": "e", "ts": 4, "cat": "c", "id": 1}]"#,
        );
        assert!(e.contains("before its \"b\""), "{e}");
    }

    #[test]
    fn both_formats_parse_to_the_same_slices() {
        let events = json!([
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 5, "args": {"name": "main"}},
            {"ph": "b", "cat": "request", "id": 1, "name": "write 1", "ts": 0.0, "pid": 1, "tid": 5},
            {"ph": "X", "name": "interrupt.dpc", "ts": 1.0, "dur": 2.0, "pid": 1, "tid": 5},
            {"ph": "B", "name": "outer", "ts": 1.5, "pid": 1, "tid": "6"},
            {"ph": "E", "ts": 2.5, "pid": 1, "tid": "6"},
            {"ph": "i", "name": "hal.map", "ts": 1.2, "pid": 1, "tid": 5, "s": "t"},
            {"ph": "C", "name": "counter", "ts": 1.2, "pid": 1, "args": {"v": 1}},
            {"ph": "e", "cat": "request", "id": 1, "ts": 4.0, "pid": 1, "tid": 5},
        ]);
        let bare = parse(&events.to_string()).unwrap();
        let object =
            parse(&json!({"traceEvents": events, "displayTimeUnit": "ms"}).to_string()).unwrap();
        for t in [&bare, &object] {
            assert_eq!(t.events, 8);
            assert_eq!(t.slices.len(), 3);
            assert_eq!(t.instants.len(), 1);
            assert_eq!(t.skipped, 1);
            assert_eq!(t.threads[&("1".to_owned(), "5".to_owned())], "main");
            let request = t.slices.iter().find(|s| s.name == "write 1").unwrap();
            assert_eq!((request.start, request.end), (0.0, 4.0));
            let outer = t.slices.iter().find(|s| s.name == "outer").unwrap();
            assert_eq!((outer.start, outer.end), (1.5, 2.5));
        }
    }

    /// A trace of `n` requests, each with a transaction, two transfers, device chains and
    /// spans on two threads.
    pub(crate) fn synthetic(n: u64) -> String {
        let mut events = vec![
            json!({"ph": "M", "name": "thread_name", "pid": 1, "tid": 1, "args": {"name": "main"}}),
            json!({"ph": "M", "name": "thread_name", "pid": 1, "tid": 2, "args": {"name": "device <&>"}}),
        ];
        for r in 0..n {
            let t0 = r as f64 * 40.0;
            let tx = r % 3;
            events.push(json!({"ph": "b", "cat": "request", "id": r, "name": format!("write {r}"), "ts": t0, "pid": 1, "tid": 1, "args": {"kind": "write", "length": 8192}}));
            events.push(json!({"ph": "b", "cat": "transaction", "id": tx, "name": format!("tx {tx}"), "ts": t0 + 1.0, "pid": 1, "tid": 1}));
            for k in 0..2u64 {
                let s = t0 + 2.0 + k as f64 * 15.0;
                events.push(json!({"ph": "X", "name": "tx.program_dma", "cat": "dmatx", "ts": s, "dur": 1.5, "pid": 1, "tid": 1, "args": {"tx": tx, "transfer": k}}));
                events.push(json!({"ph": "b", "cat": "transfer", "id": format!("{tx}.{k}"), "name": format!("tx {tx} #{k}"), "ts": s, "pid": 1, "tid": 1}));
                events.push(json!({"ph": "b", "cat": "device", "id": 0, "name": "channel 0", "ts": s + 1.0, "pid": 1, "tid": 1}));
                events.push(json!({"ph": "e", "cat": "device", "id": 0, "name": "channel 0", "ts": s + 9.0, "pid": 1, "tid": 2}));
                events.push(json!({"ph": "i", "name": "device.irq", "s": "t", "ts": s + 9.0, "pid": 1, "tid": 2}));
                events.push(json!({"ph": "X", "name": "interrupt.isr", "cat": "dmatx_runtime", "ts": s + 9.5, "dur": 0.8, "pid": 1, "tid": 2}));
                events.push(json!({"ph": "X", "name": "interrupt.dpc", "cat": "dmatx_runtime", "ts": s + 10.5, "dur": 3.0, "pid": 1, "tid": 1}));
                events.push(json!({"ph": "e", "cat": "transfer", "id": format!("{tx}.{k}"), "name": format!("tx {tx} #{k}"), "ts": s + 11.0, "pid": 1, "tid": 1}));
                events.push(json!({"ph": "i", "name": "hal.flush", "s": "t", "ts": s + 11.0, "pid": 1, "tid": 1}));
            }
            events.push(json!({"ph": "e", "cat": "transaction", "id": tx, "name": format!("tx {tx}"), "ts": t0 + 34.0, "pid": 1, "tid": 1}));
            events.push(json!({"ph": "e", "cat": "request", "id": r, "name": format!("write {r}"), "ts": t0 + 35.0, "pid": 1, "tid": 1}));
        }
        json!({"traceEvents": events}).to_string()
    }

    #[test]
    fn render_draws_lanes_in_groups_and_is_well_formed() {
        let trace = parse(&synthetic(5)).unwrap();
        let drawing = render_svg(&trace, "run & <test>.json", &RenderOptions::default()).unwrap();
        let svg = &drawing.svg;
        check_well_formed(svg).unwrap_or_else(|e| panic!("{e}\n{svg}"));
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.contains("run &amp; &lt;test&gt;.json"));
        assert!(svg.contains(&format!("{} events", trace.events)));
        // Groups in order: requests, transactions, transfers, device channels, then threads.
        let order = [
            ">requests (5 slices)<",
            ">transactions (5 slices)<",
            ">transfers (10 slices)<",
            ">device channels (10 slices)<",
            ">thread main (1)<",
            ">thread device &lt;&amp;&gt; (2)<",
        ];
        let positions: Vec<usize> = order
            .iter()
            .map(|g| svg.find(g).unwrap_or_else(|| panic!("no {g}")))
            .collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
        for lane in [
            ">tx 0<",
            ">channel 0<",
            ">program_dma<",
            ">isr<",
            ">dpc<",
            ">events<",
            ">legend<",
        ] {
            assert!(svg.contains(lane), "no lane {lane}");
        }
        // Whole trace: every slice drawn, as a rectangle, with its tooltip.
        assert_eq!(drawing.slices_shown, trace.slices.len());
        assert_eq!(svg.matches("<g><title>").count(), trace.slices.len());
        assert_eq!(drawing.instants_shown, trace.instants.len());
        assert!(drawing.window_note.starts_with("the whole trace"));
        // Wide slices carry labels.
        assert!(svg.contains(">write 0</text>"));
    }

    #[test]
    fn a_long_trace_is_cut_to_the_first_slices_and_says_so() {
        let trace = parse(&synthetic(400)).unwrap();
        assert_eq!(trace.slices.len(), 400 * 12);
        let drawing = render_svg(&trace, "long.json", &RenderOptions::default()).unwrap();
        check_well_formed(&drawing.svg).unwrap();
        assert!(
            drawing.slices_shown >= 150 && drawing.slices_shown <= 260,
            "{}",
            drawing.slices_shown
        );
        assert!(
            drawing.window_note.contains("the first"),
            "{}",
            drawing.window_note
        );
        assert!(drawing.svg.contains("--all for more"));
        // An explicit window.
        let options = RenderOptions {
            from_us: Some(800.0),
            to_us: Some(880.0),
            ..RenderOptions::default()
        };
        let drawing = render_svg(&trace, "long.json", &options).unwrap();
        assert!(
            drawing.slices_shown > 10 && drawing.slices_shown < 40,
            "{}",
            drawing.slices_shown
        );
        // Everything.
        let options = RenderOptions {
            all: true,
            ..RenderOptions::default()
        };
        let drawing = render_svg(&trace, "long.json", &options).unwrap();
        assert_eq!(drawing.slices_shown, trace.slices.len());
        check_well_formed(&drawing.svg).unwrap();
    }

    #[test]
    fn bad_options_are_refused() {
        let trace = parse(&synthetic(1)).unwrap();
        for options in [
            RenderOptions {
                from_us: Some(5.0),
                to_us: Some(5.0),
                ..RenderOptions::default()
            },
            RenderOptions {
                from_us: Some(f64::NAN),
                ..RenderOptions::default()
            },
            RenderOptions {
                max_slices: 0,
                ..RenderOptions::default()
            },
            RenderOptions {
                width: 10,
                ..RenderOptions::default()
            },
        ] {
            let e = render_svg(&trace, "x", &options).unwrap_err();
            assert!(e.starts_with("--"), "{e}");
        }
    }

    #[test]
    fn an_empty_trace_draws_an_empty_timeline() {
        let trace = parse(r#"{"traceEvents": []}"#).unwrap();
        let drawing = render_svg(&trace, "empty.json", &RenderOptions::default()).unwrap();
        check_well_formed(&drawing.svg).unwrap();
        assert!(drawing.svg.contains("nothing in this window"));
    }

    #[test]
    fn many_ids_pack_into_rows_and_overlaps_never_share_a_row() {
        let mut events = Vec::new();
        for r in 0..30u64 {
            let t = r as f64 * 3.0;
            events.push(json!({"ph": "b", "cat": "request", "id": r, "name": "r", "ts": t, "pid": 1, "tid": 1}));
            events.push(
                json!({"ph": "e", "cat": "request", "id": r, "ts": t + 10.0, "pid": 1, "tid": 1}),
            );
        }
        let trace = parse(&json!(events).to_string()).unwrap();
        let indices: Vec<usize> = (0..trace.slices.len()).collect();
        let rows = pack(&trace.slices, indices);
        assert_eq!(rows.len(), 4);
        for row in rows {
            for pair in row.windows(2) {
                assert!(trace.slices[pair[0]].end <= trace.slices[pair[1]].start);
            }
        }
        let drawing = render_svg(&trace, "r.json", &RenderOptions::default()).unwrap();
        assert!(drawing.svg.contains(">4 rows<"));
    }

    #[test]
    fn times_read_well() {
        assert_eq!(nice_step(0.7), 1.0);
        assert_eq!(nice_step(130.0), 200.0);
        assert_eq!(nice_step(4.0), 5.0);
        assert_eq!(format_time(1500.0, 5000.0), "1.5 ms");
        assert_eq!(format_time(20.0, 50.0), "20 µs");
        assert_eq!(format_time(2_500_000.0, 5e6), "2.5 s");
        assert_eq!(format_time(0.25, 0.5), "0.25 µs");
        assert_eq!(
            fit("program_dma", 1000.0, 10.0).as_deref(),
            Some("program_dma")
        );
        assert_eq!(fit("program_dma", 40.0, 10.0).as_deref(), Some("progr…"));
        assert_eq!(fit("program_dma", 10.0, 10.0), None);
        assert_eq!(escape("a<b>&\"'"), "a&lt;b&gt;&amp;&quot;&apos;");
    }

    #[test]
    fn the_checker_catches_broken_xml() {
        assert!(check_well_formed("<svg><g></svg>").is_err());
        assert!(check_well_formed("<svg a=b/>").is_err());
        assert!(check_well_formed("<svg>a & b</svg>").is_err());
        assert!(check_well_formed("<svg><text>ok &amp;</text></svg>").is_ok());
    }
}
