//! The library behind the `dmatx` command: the pieces its subcommands share and that other
//! subcommands (the demo's and the scenarios' `--trace`) use.
//!
//! * [`render`]: `dmatx trace render`, the trace parser and validator and the SVG timeline;
//! * [`output`]: files written atomically, checked for writability before a long run.

pub mod output;
pub mod render;
