//! `dmatx scenario`: the PLX9x5x sample scenarios P1–P19 of `samples.md` §4.3
//! ([`dmatx_plx::scenarios`]), run by name and reported check by check.
//!
//! `dmatx scenario P3` runs one and prints its report (each check with what was observed, the
//! notes, a verdict line); `dmatx scenario all` runs every one and prints a verdict line for
//! each and a total; `dmatx scenario --list` names them. Names are case-insensitive and may
//! carry a leading zero (`P3`, `p03`, `P03`).

use clap::Args;
use dmatx_plx::scenarios::{Report, SCENARIOS, Scenario, find};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// `dmatx scenario`.
#[derive(Args, Clone, Debug, Default, PartialEq, Eq)]
pub struct ScenarioArgs {
    /// The scenario to run: P1 … P19 (also p01, P01), or `all` for every one.
    #[arg(value_name = "NAME", required_unless_present = "list")]
    pub name: Option<String>,
    /// List the scenarios with their titles, and run nothing.
    #[arg(long, conflicts_with = "name")]
    pub list: bool,
    /// Recording the timeline is the caller's job: `run` does not look at this.
    #[arg(
        long,
        value_name = "FILE",
        help = "Write a Chrome/Perfetto timeline of the run to FILE (see docs/TRACING.md)"
    )]
    pub trace: Option<PathBuf>,
}

/// What `NAME` selects.
#[derive(Clone, Copy, Debug)]
pub enum Selection {
    /// One scenario.
    One(&'static Scenario),
    /// `all`: every scenario, in order.
    All,
}

/// Resolve a scenario name (`P1`, `p01`, `P01`, or `all`).
///
/// # Errors
/// An unknown name, on one line that names the valid ones.
pub fn select(name: &str) -> Result<Selection, String> {
    if name.trim().eq_ignore_ascii_case("all") {
        return Ok(Selection::All);
    }
    find(name).map(Selection::One).ok_or_else(|| {
        let first = SCENARIOS.first().map_or("", |s| s.name);
        let last = SCENARIOS.last().map_or("", |s| s.name);
        format!(
            "unknown scenario `{}`; known: {first} … {last}, or all (dmatx scenario --list)",
            name.trim()
        )
    })
}

/// The `--list` text: one line per scenario, its name and title.
pub fn list() -> String {
    let width = SCENARIOS.iter().map(|s| s.name.len()).max().unwrap_or(0);
    SCENARIOS
        .iter()
        .map(|s| format!("{:width$}  {}\n", s.name, s.title))
        .collect()
}

/// How one scenario run ended.
#[derive(Clone, Debug)]
pub struct Verdict {
    /// The scenario.
    pub scenario: &'static Scenario,
    /// Its report, or why the run broke down.
    pub result: Result<Report, String>,
    /// Wall time of the run.
    pub wall: Duration,
}

impl Verdict {
    /// Run `scenario` and time it.
    pub fn of(scenario: &'static Scenario) -> Self {
        let started = Instant::now();
        let result = scenario.run();
        Self {
            scenario,
            result,
            wall: started.elapsed(),
        }
    }

    /// Whether every check passed (and the run did not break down).
    pub fn passed(&self) -> bool {
        self.result.as_ref().is_ok_and(Report::passed)
    }

    /// The verdict on one line: name, pass/FAIL/BROKE, checks, time, title.
    pub fn line(&self) -> String {
        let s = self.scenario;
        let (mark, detail) = match &self.result {
            Ok(r) if r.passed() => ("ok   ", format!("{} checks", r.checks.len())),
            Ok(r) => (
                "FAIL ",
                format!("{} of {} checks failed", r.failures().len(), r.checks.len()),
            ),
            Err(_) => ("BROKE", "run broke down".to_string()),
        };
        format!(
            "{:4} {mark} {detail:<24} {:>7.2} s  {}",
            s.name,
            self.wall.as_secs_f64(),
            s.title
        )
    }

    /// `Ok` if the scenario passed, else what went wrong on one line.
    ///
    /// # Errors
    /// Failed checks (counted, the first named) or the breakdown's message.
    pub fn outcome(&self) -> Result<(), String> {
        let name = self.scenario.name;
        match &self.result {
            Ok(r) if r.passed() => Ok(()),
            Ok(r) => match r.failures().first() {
                Some(c) => Err(format!(
                    "{name}: {} of {} checks failed (first: {}: observed {}, expected {})",
                    r.failures().len(),
                    r.checks.len(),
                    c.what,
                    c.observed,
                    c.expected
                )),
                None => Err(format!("{name}: no checks were made")),
            },
            Err(e) => Err(format!("{name}: the run broke down: {e}")),
        }
    }
}

/// `dmatx scenario`: list, run one, or run all.
///
/// # Errors
/// An unknown name (before anything runs), or a scenario that failed or broke down.
pub fn run(args: &ScenarioArgs) -> Result<(), String> {
    if args.list {
        print!("{}", list());
        return Ok(());
    }
    let name = args
        .name
        .as_deref()
        .ok_or("name a scenario (P1 … P19 or all), or --list")?;
    match select(name)? {
        Selection::One(scenario) => {
            let verdict = Verdict::of(scenario);
            match &verdict.result {
                Ok(report) => println!("{report}"),
                Err(e) => println!(
                    "{}: {}\n  the run broke down: {e}",
                    scenario.name, scenario.title
                ),
            }
            verdict.outcome()
        }
        Selection::All => {
            let started = Instant::now();
            let verdicts: Vec<Verdict> = SCENARIOS
                .iter()
                .map(|s| {
                    let v = Verdict::of(s);
                    println!("{}", v.line());
                    print_problems(&v);
                    v
                })
                .collect();
            let summary = total(&verdicts, started.elapsed());
            println!("{summary}");
            if verdicts.iter().all(Verdict::passed) {
                Ok(())
            } else {
                Err(summary)
            }
        }
    }
}

/// Under a failed scenario's verdict line: its failed checks, or why it broke down.
fn print_problems(v: &Verdict) {
    match &v.result {
        Ok(r) => {
            for c in r.failures() {
                println!(
                    "       {}: observed {}, expected {}",
                    c.what, c.observed, c.expected
                );
            }
        }
        Err(e) => println!("       {e}"),
    }
}

/// The total line of `all`.
pub fn total(verdicts: &[Verdict], wall: Duration) -> String {
    let passed = verdicts.iter().filter(|v| v.passed()).count();
    let broke = verdicts.iter().filter(|v| v.result.is_err()).count();
    let failed = verdicts.len() - passed - broke;
    let checks: usize = verdicts
        .iter()
        .filter_map(|v| v.result.as_ref().ok())
        .map(|r| r.checks.len())
        .sum();
    format!(
        "{} scenarios: {passed} passed, {failed} failed, {broke} broke down ({checks} checks, \
         {:.1} s)",
        verdicts.len(),
        wall.as_secs_f64()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ScenarioArgs,
    }

    fn parse(argv: &[&str]) -> Result<ScenarioArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("scenario").chain(argv.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn names_resolve_with_case_and_leading_zeros() {
        for (name, expected) in [("P1", "P1"), ("p01", "P1"), ("P01", "P1"), ("p19", "P19")] {
            match select(name) {
                Ok(Selection::One(s)) => assert_eq!(s.name, expected, "{name}"),
                other => panic!("{name}: {other:?}"),
            }
        }
        assert!(matches!(select("all"), Ok(Selection::All)));
        assert!(matches!(select("ALL"), Ok(Selection::All)));
    }

    #[test]
    fn an_unknown_name_is_one_line_naming_the_known_ones() {
        for bad in ["P99", "P0", "X1", "", "P", "1"] {
            let e = select(bad).unwrap_err();
            assert!(e.contains(&format!("`{bad}`")), "{e}");
            assert!(e.contains("known: P1 … P19"), "{e}");
            assert!(e.contains("dmatx scenario --list"), "{e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
        let e = run(&ScenarioArgs {
            name: Some("P99".into()),
            ..ScenarioArgs::default()
        })
        .unwrap_err();
        assert!(e.starts_with("unknown scenario `P99`"), "{e}");
    }

    #[test]
    fn the_list_names_every_scenario_once() {
        let text = list();
        assert_eq!(text.lines().count(), SCENARIOS.len());
        for (line, s) in text.lines().zip(SCENARIOS) {
            assert!(
                line.starts_with(s.name) && line.ends_with(s.title),
                "{line}"
            );
        }
    }

    #[test]
    fn arguments_need_a_name_or_list_but_not_both() {
        assert_eq!(parse(&["p3"]).unwrap().name.as_deref(), Some("p3"));
        assert!(parse(&["--list"]).unwrap().list);
        assert!(parse(&[]).is_err());
        assert!(parse(&["P1", "--list"]).is_err());
        let traced = parse(&["all", "--trace", "t.json"]).unwrap();
        assert_eq!(traced.trace, Some(PathBuf::from("t.json")));
    }

    #[test]
    fn one_scenario_runs_and_its_verdict_reads_well() {
        let Ok(Selection::One(p1)) = select("p01") else {
            panic!("P1 not found");
        };
        let v = Verdict::of(p1);
        v.outcome().unwrap();
        assert!(v.passed());
        let line = v.line();
        assert!(line.starts_with("P1   ok "), "{line}");
        assert!(line.ends_with(p1.title), "{line}");
        let total = total(std::slice::from_ref(&v), v.wall);
        assert!(
            total.starts_with("1 scenarios: 1 passed, 0 failed, 0 broke down"),
            "{total}"
        );
    }

    #[test]
    fn a_failed_or_broken_run_is_an_error_naming_the_first_failure() {
        let p1 = &SCENARIOS[0];
        let mut report = p1.run().unwrap();
        report.checks[0].ok = false;
        let failed = Verdict {
            scenario: p1,
            result: Ok(report.clone()),
            wall: Duration::ZERO,
        };
        let e = failed.outcome().unwrap_err();
        assert!(e.starts_with("P1: 1 of "), "{e}");
        assert!(e.contains(&report.checks[0].what), "{e}");
        assert!(failed.line().contains("FAIL"), "{}", failed.line());
        let broken = Verdict {
            scenario: p1,
            result: Err("the board would not build".into()),
            wall: Duration::ZERO,
        };
        assert_eq!(
            broken.outcome().unwrap_err(),
            "P1: the run broke down: the board would not build"
        );
        let total = total(&[failed, broken], Duration::ZERO);
        assert!(
            total.starts_with("2 scenarios: 0 passed, 1 failed, 1 broke down"),
            "{total}"
        );
    }
}
