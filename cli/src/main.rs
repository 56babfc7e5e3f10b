//! The `dmatx` command (placeholder until the demo lands).
fn main() {}
