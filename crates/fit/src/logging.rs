//! dtrain's one logging mechanism: `tracing` events, written by one layer in the run's format.
//! Notes about training (Keras's own lines: early stopping, learning-rate changes, the
//! cluster line) use target `NOTE` and go to stdout with the progress; everything else is the
//! process's log and goes to stderr, as `program: message` lines or as JSON objects.

use crate::progress::LogFormat;
use std::fmt::Write as _;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

/// The target of notes about training, shown with the progress (`tracing::info!(target: NOTE, ...)`).
pub const NOTE: &str = "dtrain::note";

/// Installs the layer for this process: `program` prefixes text log lines. Call once, early.
pub fn init(program: &'static str, format: LogFormat) {
    let subscriber = tracing_subscriber::registry().with(Lines { program, format });
    // Only the first call installs (tests and embedding programs may have their own).
    let _ = tracing::subscriber::set_global_default(subscriber);
}

struct Lines {
    program: &'static str,
    format: LogFormat,
}

/// An event's message and other fields, as text.
#[derive(Default)]
struct Fields {
    message: String,
    rest: String,
}

impl Fields {
    fn add(&mut self, field: &Field, text: std::fmt::Arguments<'_>) {
        match field.name() {
            "message" => self.message = text.to_string(),
            name => {
                let _ = write!(self.rest, " {name}={text}");
            }
        }
    }
}

impl Visit for Fields {
    // Strings as they are (Debug would quote them), everything else by Debug.
    fn record_str(&mut self, field: &Field, value: &str) {
        self.add(field, format_args!("{value}"));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.add(field, format_args!("{value:?}"));
    }
}

impl<S: Subscriber> Layer<S> for Lines {
    /// dtrain's own events, and only warnings and errors from its libraries (h2, hyper and
    /// tonic trace every frame at lower levels).
    fn enabled(&self, meta: &tracing::Metadata<'_>, _ctx: Context<'_, S>) -> bool {
        meta.target().starts_with("dtrain") || *meta.level() <= tracing::Level::WARN
    }

    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut f = Fields::default();
        event.record(&mut f);
        let message = f.message + &f.rest;
        let meta = event.metadata();
        let note = meta.target() == NOTE;
        match (self.format, note) {
            (LogFormat::Quiet, true) => {}
            (LogFormat::Text, true) => println!("{message}"),
            (LogFormat::Text | LogFormat::Quiet, false) => eprintln!("{}: {message}", self.program),
            (LogFormat::Json, true) => {
                println!("{{\"event\":\"note\",\"message\":{}}}", serde_json::Value::from(message))
            }
            (LogFormat::Json, false) => eprintln!(
                "{{\"event\":\"log\",\"program\":\"{}\",\"level\":\"{}\",\"target\":{},\"message\":{}}}",
                self.program,
                meta.level().as_str().to_ascii_lowercase(),
                serde_json::Value::from(meta.target()),
                serde_json::Value::from(message)
            ),
        }
    }
}
