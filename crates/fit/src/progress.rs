//! What a run shows while it trains: a Keras-like progress bar and epoch lines, JSON lines
//! for log collectors, or nothing.

use crate::logs::EpochLogs;
use std::io::{IsTerminal, Write};
use std::time::Instant;

/// What a run shows as it trains (the progress bar, epoch lines, JSON events).
pub trait Observer {
    /// Training starts: the model summary, the run directory, samples.
    fn train_begin(&mut self, _summary: &str, _run_dir: &str, _samples: usize, _val: usize) {}
    /// An epoch starts.
    fn epoch_begin(&mut self, _epoch: usize, _epochs: usize, _steps: usize) {}
    /// A batch's step was applied.
    fn batch_end(&mut self, _batch: usize, _steps: usize, _loss: f32, _accuracy: Option<f32>) {}
    /// An epoch ended, with its logs and how long it took.
    fn epoch_end(&mut self, _logs: &EpochLogs, _epochs: usize, _steps: usize, _time: EpochTime) {}
    /// Training ended.
    fn train_end(&mut self, _report: &Report) {}
    /// Checked after every step: true stops training after saving the state (SIGTERM).
    fn interrupted(&mut self) -> bool {
        false
    }
    /// Where the trainer records its metrics, if anyone serves them.
    fn metrics(&self) -> Option<std::sync::Arc<crate::metrics::Metrics>> {
        None
    }
    /// Where TensorBoard event logs are written, if this front end writes them.
    fn boards(&mut self) -> Option<&mut dyn crate::boards::Boards> {
        None
    }
}

/// How long an epoch took.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EpochTime {
    /// The whole epoch, as Keras counts it: its steps, validation, callbacks and the saved state.
    pub seconds: f64,
    /// Its steps alone (each from handing the batch to the engine until the batch's callbacks
    /// ran): what a step costs once an epoch is long enough that its end no longer counts.
    pub in_steps: f64,
}

/// The end-of-run report.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Epochs run by this call.
    pub epochs_run: usize,
    /// Whether EarlyStopping ended it.
    pub stopped_early: bool,
    /// The epoch with the lowest validation loss, and its logs.
    pub best: Option<(usize, EpochLogs)>,
    /// The final weights' file.
    pub final_weights: String,
    /// The checkpoint files written.
    pub checkpoints: Vec<String>,
    /// Wall time of training.
    pub seconds: f64,
    /// Training samples per second.
    pub samples_per_second: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
/// How a run reports.
pub enum LogFormat {
    /// Keras-like progress and epoch lines.
    Text,
    /// One JSON object per event.
    Json,
    /// Nothing but errors.
    Quiet,
}

/// The terminal (or log collector) as an `Observer`.
pub struct Console {
    format: LogFormat,
    bar: LiveBar,
    epoch_start: Instant,
    last_draw: Option<Instant>,
    interrupt: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
    boards: Option<Box<dyn crate::boards::Boards>>,
}

impl Console {
    /// Reports in `format`.
    pub fn new(format: LogFormat) -> Self {
        Console {
            format,
            bar: if std::io::stderr().is_terminal() { LiveBar::Terminal } else { LiveBar::Off },
            epoch_start: Instant::now(),
            last_draw: None,
            interrupt: None,
            metrics: None,
            boards: None,
        }
    }

    /// Draws the live progress bar on stderr even when it is not a terminal, with carriage
    /// returns and spaces but no ANSI escapes: for notebooks (`dtrain.fit(verbose=1)`), which
    /// show it as they show Keras's own bar. Text format only.
    pub fn with_progress_bar(mut self) -> Self {
        if self.bar == LiveBar::Off {
            self.bar = LiveBar::Plain { width: 0 };
        }
        self
    }

    /// Writes the TensorBoard callback's event logs with `b`.
    pub fn with_boards(mut self, b: Box<dyn crate::boards::Boards>) -> Self {
        self.boards = Some(b);
        self
    }

    /// Records the run's metrics into `m` (served by the coordinator's metrics endpoint).
    pub fn with_metrics(mut self, m: std::sync::Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(m);
        self
    }

    /// Training stops (with its state saved) once `flag` is set, e.g. by a signal handler.
    pub fn with_interrupt(mut self, flag: std::sync::Arc<std::sync::atomic::AtomicBool>) -> Self {
        self.interrupt = Some(flag);
        self
    }
}

/// How the batch-by-batch progress line is drawn on stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LiveBar {
    /// Not at all (stderr is a file or a pipe).
    Off,
    /// Redrawn in place with a carriage return and an ANSI line erase.
    Terminal,
    /// Redrawn with a carriage return, padded with spaces over the `width` characters drawn before.
    Plain { width: usize },
}

fn bar(done: usize, total: usize) -> String {
    let width = 20;
    let filled = (done * width).checked_div(total).unwrap_or(width).min(width);
    format!("{}{}", "━".repeat(filled), " ".repeat(width - filled))
}

fn metrics(loss: f32, accuracy: Option<f32>) -> String {
    match accuracy {
        Some(a) => format!("accuracy: {a:.4} - loss: {loss:.4}"),
        None => format!("loss: {loss:.4}"),
    }
}

fn json_num(v: Option<f32>) -> String {
    v.filter(|x| x.is_finite()).map_or("null".into(), |x| f64::from(x).to_string())
}

impl Observer for Console {
    fn metrics(&self) -> Option<std::sync::Arc<crate::metrics::Metrics>> {
        self.metrics.clone()
    }

    fn boards(&mut self) -> Option<&mut dyn crate::boards::Boards> {
        self.boards.as_deref_mut().map(|b| b as &mut dyn crate::boards::Boards)
    }

    fn interrupted(&mut self) -> bool {
        self.interrupt.as_ref().is_some_and(|f| f.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn train_begin(&mut self, summary: &str, run_dir: &str, samples: usize, val: usize) {
        match self.format {
            LogFormat::Text => {
                print!("{summary}");
                println!("Run directory: {run_dir}");
                println!("Training on {samples} samples, validating on {val}");
            }
            LogFormat::Json => println!(
                "{{\"event\":\"train_begin\",\"run_dir\":{},\"samples\":{samples},\"val_samples\":{val}}}",
                serde_json::Value::from(run_dir)
            ),
            LogFormat::Quiet => {}
        }
    }

    fn epoch_begin(&mut self, epoch: usize, epochs: usize, _steps: usize) {
        self.epoch_start = Instant::now();
        self.last_draw = None;
        if self.format == LogFormat::Text {
            println!("Epoch {}/{epochs}", epoch + 1);
        }
    }

    fn batch_end(&mut self, batch: usize, steps: usize, loss: f32, accuracy: Option<f32>) {
        if self.format != LogFormat::Text || self.bar == LiveBar::Off {
            return;
        }
        let now = Instant::now();
        if self.last_draw.is_some_and(|t| now.duration_since(t).as_millis() < 100) && batch + 1 < steps {
            return;
        }
        self.last_draw = Some(now);
        let done = batch + 1;
        let el = now.duration_since(self.epoch_start).as_secs_f64();
        let eta = el / done as f64 * (steps - done) as f64;
        let line = format!("{done}/{steps} {} ETA {eta:.0}s - {}", bar(done, steps), metrics(loss, accuracy));
        match &mut self.bar {
            LiveBar::Plain { width } => {
                let len = line.chars().count();
                eprint!("\r{line}{}", " ".repeat(width.saturating_sub(len)));
                *width = len;
            }
            _ => eprint!("\r\x1b[2K{line}"),
        }
        let _ = std::io::stderr().flush();
    }

    fn epoch_end(&mut self, logs: &EpochLogs, _epochs: usize, steps: usize, time: EpochTime) {
        let seconds = time.seconds;
        match self.format {
            LogFormat::Text => {
                match &mut self.bar {
                    LiveBar::Terminal => eprint!("\r\x1b[2K"),
                    LiveBar::Plain { width } => {
                        eprint!("\r{}\r", " ".repeat(*width));
                        *width = 0;
                    }
                    LiveBar::Off => {}
                }
                let _ = std::io::stderr().flush();
                let per_step = seconds * 1000.0 / steps.max(1) as f64;
                let mut line = format!(
                    "{steps}/{steps} {} {seconds:.1}s {per_step:.2}ms/step - {}",
                    bar(steps, steps),
                    metrics(logs.loss, logs.accuracy)
                );
                if let Some(a) = logs.val_accuracy {
                    line += &format!(" - val_accuracy: {a:.4}");
                }
                if let Some(l) = logs.val_loss {
                    line += &format!(" - val_loss: {l:.4}");
                }
                line += &format!(" - learning_rate: {:.4e}", logs.learning_rate);
                println!("{line}");
            }
            LogFormat::Json => println!(
                "{{\"event\":\"epoch_end\",\"epoch\":{},\"loss\":{},\"accuracy\":{},\"val_loss\":{},\"val_accuracy\":{},\"learning_rate\":{},\"seconds\":{seconds:.3},\"step_seconds\":{:.6},\"steps\":{steps}}}",
                logs.epoch + 1,
                json_num(Some(logs.loss)),
                json_num(logs.accuracy),
                json_num(logs.val_loss),
                json_num(logs.val_accuracy),
                json_num(Some(logs.learning_rate)),
                time.in_steps,
            ),
            LogFormat::Quiet => {}
        }
    }

    fn train_end(&mut self, r: &Report) {
        match self.format {
            LogFormat::Text => {
                println!(
                    "Done: {} epoch(s){} in {:.1}s ({:.0} samples/s)",
                    r.epochs_run,
                    if r.stopped_early { ", stopped early" } else { "" },
                    r.seconds,
                    r.samples_per_second
                );
                if let Some((e, l)) = &r.best {
                    let acc = l.val_accuracy.map_or(String::new(), |a| format!(", val_accuracy {a:.4}"));
                    println!("Best epoch: {} (val_loss {:.4}{acc})", e + 1, l.val_loss.unwrap_or(f32::NAN));
                }
                for c in &r.checkpoints {
                    println!("Checkpoint: {c}");
                }
                println!("Final weights: {}", r.final_weights);
            }
            LogFormat::Json => println!(
                "{{\"event\":\"train_end\",\"epochs\":{},\"stopped_early\":{},\"seconds\":{:.3},\"samples_per_second\":{:.1},\"final_weights\":{}}}",
                r.epochs_run,
                r.stopped_early,
                r.seconds,
                r.samples_per_second,
                serde_json::Value::from(r.final_weights.as_str())
            ),
            LogFormat::Quiet => {}
        }
    }
}
