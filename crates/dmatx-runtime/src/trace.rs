//! Tracing: the runtime's events of `docs/TRACING.md` (its second table), through the
//! `tracing` crate, with the `tracing` feature (which turns on the core's too).
//!
//! Without the feature the macros expand to nothing (a span is `NoSpan`, which does
//! nothing), so nothing is compiled in. With it, events are emitted with no runtime lock held
//! (a subscriber is user code, and driver code runs outside runtime locks), except the
//! `interrupt.isr` span, which lives under the interrupt lock as the ISR itself does.

/// Emit a runtime event: `trace_event!("request.deliver", request = id)`. Call it with no
/// runtime lock held.
#[cfg(feature = "tracing")]
macro_rules! trace_event {
    ($name:literal, $($fields:tt)+) => {
        ::tracing::event!(
            name: $name,
            target: "dmatx_runtime",
            ::tracing::Level::DEBUG,
            $($fields)+
        )
    };
}

/// Without the `tracing` feature: nothing.
#[cfg(not(feature = "tracing"))]
macro_rules! trace_event {
    ($($any:tt)*) => {};
}

/// A runtime span (not entered yet): `trace_span!("interrupt.dpc")`, or with fields.
#[cfg(feature = "tracing")]
macro_rules! trace_span {
    ($name:literal $(, $($fields:tt)+)?) => {
        ::tracing::span!(
            target: "dmatx_runtime",
            ::tracing::Level::DEBUG,
            $name
            $(, $($fields)+)?
        )
    };
}

/// Without the `tracing` feature: a span that does nothing.
#[cfg(not(feature = "tracing"))]
macro_rules! trace_span {
    ($($any:tt)*) => {
        $crate::trace::NoSpan
    };
}

/// What `trace_span!` gives without the `tracing` feature: nothing to enter or record.
#[cfg(not(feature = "tracing"))]
pub(crate) struct NoSpan;

#[cfg(not(feature = "tracing"))]
impl NoSpan {
    /// Nothing to enter.
    #[inline(always)]
    pub(crate) fn enter(&self) -> NoSpan {
        NoSpan
    }

    /// Nothing to record.
    #[inline(always)]
    pub(crate) fn record<V>(&self, _field: &str, _value: V) {}
}

#[cfg(feature = "tracing")]
pub(crate) use on::*;

#[cfg(feature = "tracing")]
mod on {
    use crate::request::RequestKind;
    use dmatx::Result;
    use std::fmt;

    /// `request.submit`'s `kind`.
    pub(crate) fn kind_name(kind: RequestKind) -> &'static str {
        match kind {
            RequestKind::Read => "read",
            RequestKind::Write => "write",
            RequestKind::DeviceControl => "device_control",
            RequestKind::InternalDeviceControl => "internal_device_control",
            RequestKind::Other => "other",
        }
    }

    /// A status field: `success`, or the error's name (its `Debug`: `Cancelled`, `IoTimeout`).
    pub(crate) struct Status(pub(crate) Result<()>);

    impl fmt::Debug for Status {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match &self.0 {
                Ok(()) => f.write_str("success"),
                Err(e) => fmt::Debug::fmt(e, f),
            }
        }
    }
}
