//! The `dmatx` binary's `demo` and `scenario` subcommands, run as a user would.

use std::process::{Command, Output};

fn dmatx(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dmatx"))
        .args(args)
        .output()
        .expect("the dmatx binary runs")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The value of the summary row named `row`.
fn row<'a>(text: &'a str, row: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.strip_prefix(row))
        .unwrap_or_else(|| panic!("no row {row:?} in\n{text}"))
        .trim()
}

#[test]
fn demo_verifies_its_round_trips_and_prints_a_summary() {
    let out = dmatx(&[
        "demo",
        "--count",
        "20",
        "--max-size",
        "20000",
        "--seed",
        "2",
    ]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}{}", stderr(&out));
    assert!(
        text.starts_with("dmatx demo: 20 round trips of 1..=20000 bytes"),
        "{text}"
    );
    assert_eq!(row(&text, "round trips (write + read-back)"), "20");
    assert_eq!(row(&text, "requests (with retries)"), "40");
    let verified: u64 = row(&text, "bytes verified").parse().unwrap();
    assert!((20..=20 * 20_000).contains(&verified), "{text}");
    assert_eq!(row(&text, "sanitizer record"), "0 violations");
    assert_eq!(row(&text, "read-backs that differed"), "0");
    assert_eq!(row(&text, "board shut down"), "clean");
    assert!(row(&text, "throughput").ends_with("MB/s of verified bytes"));
    // stderr is not a terminal here: no progress bar.
    assert_eq!(stderr(&out), "");
}

#[test]
fn demo_survives_faults_on_the_hardened_driver_with_the_deferred_engine() {
    let out = dmatx(&[
        "demo",
        "--count",
        "40",
        "--faults",
        "--hardened",
        "--engine",
        "deferred",
        "--seed",
        "9",
    ]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}{}", stderr(&out));
    assert!(
        text.contains("(hardened driver, deferred engine, faults on)"),
        "{text}"
    );
    assert!(row(&text, "faults").contains("planned"), "{text}");
    assert!(row(&text, "errors").ends_with(", 0 unexpected"), "{text}");
    assert_eq!(row(&text, "board shut down"), "clean");
}

#[test]
fn demo_refuses_sizes_outside_the_sram_before_running() {
    for bad in ["0", "131073"] {
        let out = dmatx(&["demo", "--max-size", bad]);
        assert!(!out.status.success(), "--max-size {bad} accepted");
        let message = stderr(&out);
        assert!(
            message.starts_with(&format!("dmatx: --max-size {bad}: "))
                && message.contains("131072"),
            "{message}"
        );
        assert_eq!(message.trim_end().lines().count(), 1, "{message}");
        // Nothing ran: no headline, no summary.
        assert_eq!(stdout(&out), "");
    }
}

#[test]
fn demo_and_scenario_document_their_options() {
    let demo = stdout(&dmatx(&["demo", "--help"]));
    for option in [
        "--count",
        "--max-size",
        "--seed",
        "--faults",
        "--hardened",
        "--engine",
        "--quiet",
        "--trace",
    ] {
        assert!(demo.contains(option), "{option} missing from\n{demo}");
    }
    assert!(demo.contains("docs/TRACING.md"), "{demo}");
    // Every option line carries a description after its name.
    for line in demo.lines().filter(|l| l.trim_start().starts_with("--")) {
        assert!(line.split_whitespace().count() >= 3, "bare option {line:?}");
    }
    let scenario = stdout(&dmatx(&["scenario", "--help"]));
    for option in ["NAME", "--list", "--trace"] {
        assert!(
            scenario.contains(option),
            "{option} missing from\n{scenario}"
        );
    }
}

#[test]
fn scenario_runs_one_by_any_spelling_of_its_name() {
    for name in ["P3", "p03", "P03"] {
        let out = dmatx(&["scenario", name]);
        let text = stdout(&out);
        assert!(out.status.success(), "{name}: {text}{}", stderr(&out));
        assert!(text.starts_with("P3: write 20000 bytes"), "{text}");
        assert!(text.trim_end().ends_with("all passed"), "{text}");
        assert!(!text.contains("FAIL"), "{text}");
    }
    // A report's notes are printed too.
    let text = stdout(&dmatx(&["scenario", "P16"]));
    assert!(text.contains("note: "), "{text}");
}

#[test]
fn scenario_refuses_an_unknown_name_on_one_line() {
    let out = dmatx(&["scenario", "P99"]);
    assert!(!out.status.success());
    let message = stderr(&out);
    assert!(
        message.starts_with("dmatx: unknown scenario `P99`; known: P1 … P19"),
        "{message}"
    );
    assert!(message.contains("dmatx scenario --list"), "{message}");
    assert_eq!(message.trim_end().lines().count(), 1, "{message}");
    assert_eq!(stdout(&out), "");
}

#[test]
fn scenario_lists_every_name_with_its_title() {
    let out = dmatx(&["scenario", "--list"]);
    assert!(out.status.success());
    let text = stdout(&out);
    let names: Vec<&str> = text
        .lines()
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    let expected: Vec<String> = (1..=19).map(|n| format!("P{n}")).collect();
    assert_eq!(names, expected);
}

#[test]
fn scenario_all_gives_a_verdict_per_scenario_and_a_total() {
    let out = dmatx(&["scenario", "all"]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}{}", stderr(&out));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 20, "{text}");
    for (n, line) in lines[..19].iter().enumerate() {
        let mut words = line.split_whitespace();
        assert_eq!(words.next(), Some(format!("P{}", n + 1).as_str()), "{line}");
        assert_eq!(words.next(), Some("ok"), "{line}");
    }
    assert!(
        lines[19].starts_with("19 scenarios: 19 passed, 0 failed, 0 broke down"),
        "{text}"
    );
}

/// A scratch directory for one test's files.
fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("dmatx-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    dir
}

#[test]
fn demo_trace_is_valid_trace_event_json_with_every_lane_and_renders() {
    let dir = scratch("trace");
    let json = dir.join("demo.json");
    let svg = dir.join("demo.svg");
    let out = dmatx(&[
        "demo",
        "--quiet",
        "--count",
        "5",
        "--max-size",
        "20000",
        "--trace",
        json.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = std::fs::read_to_string(&json).expect("the trace was written");
    let trace: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let events = trace["traceEvents"]
        .as_array()
        .expect("a traceEvents array");
    let has = |ph: &str, field: &str, value: &str| {
        events
            .iter()
            .any(|e| e["ph"] == ph && e[field].as_str() == Some(value))
    };
    // Requests, transaction uses, transfers and device chains as async slices.
    for cat in ["request", "transaction", "transfer", "device"] {
        assert!(has("b", "cat", cat), "no {cat} slice");
        assert!(has("e", "cat", cat), "no end of a {cat} slice");
    }
    // Program-DMA calls, ISRs and DPCs as complete slices on their threads.
    for name in ["program_dma", "isr", "dpc"] {
        assert!(
            events
                .iter()
                .any(|e| e["ph"] == "X" && e["name"].as_str().is_some_and(|n| n.contains(name))),
            "no {name} span"
        );
    }
    // Every begin has its end.
    let begins = events.iter().filter(|e| e["ph"] == "b").count();
    let ends = events.iter().filter(|e| e["ph"] == "e").count();
    assert_eq!(begins, ends);
    // 5 round trips: 10 requests.
    assert_eq!(
        events
            .iter()
            .filter(|e| e["ph"] == "b" && e["cat"] == "request")
            .count(),
        10
    );
    let out = dmatx(&[
        "trace",
        "render",
        json.to_str().unwrap(),
        svg.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let drawing = std::fs::read_to_string(&svg).expect("the SVG was written");
    assert!(drawing.starts_with("<svg") || drawing.starts_with("<?xml"));
    assert!(drawing.trim_end().ends_with("</svg>"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_unwritable_trace_path_fails_before_the_run_and_leaves_nothing() {
    let dir = scratch("unwritable");
    let target = dir.join("missing").join("t.json");
    let out = dmatx(&["demo", "--quiet", "--trace", target.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains("cannot write"), "{err}");
    assert!(stdout(&out).is_empty(), "nothing ran: {}", stdout(&out));
    assert!(!dir.join("missing").exists());
    let _ = std::fs::remove_dir_all(&dir);
}
