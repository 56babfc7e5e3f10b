//! The library behind the `dmatx` command: the pieces its subcommands share and that other
//! subcommands (the demo's and the scenarios' `--trace`) use.
//!
//! * [`trace`]: the recorder, a `tracing` layer that writes Chrome/Perfetto trace-event JSON
//!   (the contract is `docs/TRACING.md`);
//! * [`render`]: `dmatx trace render`, the trace parser and validator and the SVG timeline;
//! * [`bench`](mod@bench): `dmatx bench`, throughput against transaction size on the simulated
//!   machine;
//! * [`demo`](mod@demo): `dmatx demo`, the PLX9x5x driver on the simulated board;
//! * [`scenario`](mod@scenario): `dmatx scenario`, the sample scenarios P1–P19;
//! * [`plot`]: SVG line plots of named series;
//! * [`output`]: files written atomically, checked for writability before a long run.
//!
//! Recording a run and writing its trace:
//!
//! ```no_run
//! use dmatx_cli::{output::AtomicOutput, trace::Recorder};
//!
//! let out = AtomicOutput::prepare("run.json".as_ref())?; // fails now, not after the run
//! let recorder = Recorder::new();
//! recorder.install_global()?;                              // every thread's events
//! // ... the run ...
//! out.write(recorder.finish().as_bytes())?;
//! # Ok::<(), String>(())
//! ```

pub mod bench;
pub mod demo;
pub mod output;
pub mod plot;
pub mod render;
pub mod scenario;
pub mod trace;
