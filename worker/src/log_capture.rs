//! A worker's log lines while it runs a job's rank, kept for the coordinator: a `tracing` layer
//! beside the worker's own log output that copies every event at info and above, from every
//! thread of the process (the training thread, the checkpoint uploader, the gradient ring), while
//! an assignment runs. The agent sends them up the heartbeat stream (`LogBatch`), where the
//! coordinator stores them with the job (`smelt jobs logs`).
//!
//! Each line is tagged with the run it was logged in as it is logged, so lines of a run that
//! ended are never sent as the next one's. The buffer is bounded: while the coordinator is
//! unreachable the oldest lines go, and the next batch says how many.
//!
//! Batches are numbered (`LogBatch.seq`, from 1) and kept after they are sent until the
//! coordinator acknowledges them (`LogsAck`, once its store has committed them): a heartbeat
//! stream that breaks loses the messages queued on it, so the agent sends every batch not yet
//! acknowledged again, first, on its next stream, and the coordinator stores each number once.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use smelt_proto::v1::{Assignment, LogBatch, LogLine};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

/// Lines held at most (about 2 MB of typical lines).
pub const MAX_BUFFERED: usize = 10_000;

/// Bytes of text held at most (long lines fill it before the line count does).
pub const MAX_BUFFERED_BYTES: usize = 8 * 1024 * 1024;

/// Targets whose info lines are transport noise, not the run's story.
const QUIET_TARGETS: [&str; 4] = ["h2", "hyper", "tower", "tonic"];

/// Longest text kept of one line (the coordinator keeps no more either).
pub const MAX_LINE: usize = 16 * 1024;

/// Bytes of text per batch at most (well under gRPC's 4 MiB message limit), so a buffer full
/// of long lines goes up as several messages.
pub const MAX_BATCH_BYTES: usize = 1024 * 1024;

fn quiet(target: &str) -> bool {
    QUIET_TARGETS.iter().any(|t| target.strip_prefix(t).is_some_and(|rest| rest.is_empty() || rest.starts_with("::")))
}

/// `text` cut to at most [`MAX_LINE`] bytes, at a character boundary.
fn cut(mut text: String) -> String {
    if text.len() > MAX_LINE {
        let mut at = MAX_LINE;
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        text.truncate(at);
        text.push_str(" [truncated]");
    }
    text
}

/// The run a line belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
struct RunKey {
    job_id: String,
    attempt: u32,
    rank: u32,
}

#[derive(Default, Debug)]
struct Inner {
    run: Option<Arc<RunKey>>,
    lines: VecDeque<(Arc<RunKey>, LogLine)>,
    /// Bytes of text and target in `lines`.
    bytes: usize,
    /// Lines dropped for a full buffer, by run, oldest first (sent before that run's next lines).
    dropped: Vec<(Arc<RunKey>, u64)>,
    /// The last batch number given (0: none yet).
    last_seq: u64,
    /// Batches handed out and not yet acknowledged, oldest first.
    unacked: VecDeque<LogBatch>,
    /// Bytes of text and target in `unacked`.
    unacked_bytes: usize,
    /// The coordinator acknowledges batches: keep them until it does (else sent is done).
    keep: bool,
}

/// What a line weighs against the byte bound.
fn size(l: &LogLine) -> usize {
    l.text.len() + l.target.len()
}

fn batch_size(b: &LogBatch) -> usize {
    b.lines.iter().map(size).sum()
}

impl Inner {
    /// Drops the oldest lines, counted, until the buffer is within its bounds.
    fn bound(&mut self) {
        while self.lines.len() > MAX_BUFFERED || (self.bytes > MAX_BUFFERED_BYTES && self.lines.len() > 1) {
            let Some((old, line)) = self.lines.pop_front() else { break };
            self.bytes -= size(&line);
            match self.dropped.iter_mut().find(|(k, _)| *k == old) {
                Some((_, n)) => *n += 1,
                None => self.dropped.push((old, 1)),
            }
        }
    }
}

/// Unacknowledged batches held at most (besides [`MAX_BUFFERED_BYTES`] of their text).
pub const MAX_UNACKED_BATCHES: usize = 1_000;

/// The layer and the agent's handle on it (cheap to clone: one shared buffer).
#[derive(Clone, Debug)]
pub struct LogCapture {
    inner: Arc<Mutex<Inner>>,
}

impl Default for LogCapture {
    fn default() -> Self {
        LogCapture { inner: Arc::new(Mutex::new(Inner { keep: true, ..Inner::default() })) }
    }
}

impl LogCapture {
    pub fn new() -> Self {
        Self::default()
    }

    /// From now on, lines belong to `a`'s run.
    pub fn begin(&self, a: &Assignment) {
        let key = RunKey { job_id: a.job_id.clone(), attempt: a.attempt, rank: a.rank };
        self.lock().run = Some(Arc::new(key));
    }

    /// No run: lines are no longer kept (those kept are still sent).
    pub fn end(&self) {
        self.lock().run = None;
    }

    /// Every line kept so far, as one numbered batch per run (and megabyte) in the order logged;
    /// each is also kept until [`LogCapture::acked`] covers it.
    pub fn drain(&self) -> Vec<LogBatch> {
        let (lines, dropped) = {
            let mut g = self.lock();
            g.bytes = 0;
            (std::mem::take(&mut g.lines), std::mem::take(&mut g.dropped))
        };
        // built outside the lock: the threads that log (the training thread among them) do
        // not wait on it
        let mut out = Self::batches(lines, dropped);
        let mut g = self.lock();
        for b in &mut out {
            g.last_seq += 1;
            b.seq = g.last_seq;
        }
        if g.keep {
            for b in &out {
                g.unacked_bytes += batch_size(b);
                g.unacked.push_back(b.clone());
            }
        }
        // Unacknowledged batches are bounded too. They pile up only while a stream stays up
        // with its acknowledgements lagging (its store stalled): those went out on a live
        // stream, so the oldest are let go, uncounted, rather than counted as dropped while
        // they are most likely stored.
        while g.unacked.len() > 1 && (g.unacked_bytes > MAX_BUFFERED_BYTES || g.unacked.len() > MAX_UNACKED_BATCHES) {
            let old = g.unacked.pop_front().expect("len > 1");
            g.unacked_bytes -= batch_size(&old);
        }
        out
    }

    /// Whether the coordinator acknowledges batches (`RegisterResponse.acks_logs`): if not, a
    /// batch is done once sent, and none is kept to send again (an older coordinator would
    /// store it twice).
    pub fn keep_until_acked(&self, keep: bool) {
        let mut g = self.lock();
        g.keep = keep;
        if !keep {
            g.unacked.clear();
            g.unacked_bytes = 0;
        }
    }

    /// How many batches await an acknowledgement.
    pub fn unacked_count(&self) -> usize {
        self.lock().unacked.len()
    }

    /// The batches handed out and not acknowledged yet, oldest first: to send again, before
    /// anything else, on a new stream.
    pub fn unacked(&self) -> Vec<LogBatch> {
        self.lock().unacked.iter().cloned().collect()
    }

    /// The coordinator has committed every batch numbered up to `seq`.
    pub fn acked(&self, seq: u64) {
        let mut g = self.lock();
        while g.unacked.front().is_some_and(|b| b.seq <= seq) {
            let b = g.unacked.pop_front().expect("checked");
            g.unacked_bytes -= batch_size(&b);
        }
    }

    /// `lines` as batches, one per run and megabyte, each run's drop count on its first.
    fn batches(lines: VecDeque<(Arc<RunKey>, LogLine)>, dropped: Vec<(Arc<RunKey>, u64)>) -> Vec<LogBatch> {
        let mut out: Vec<LogBatch> = Vec::new();
        let mut dropped: VecDeque<(Arc<RunKey>, u64)> = dropped.into();
        let batch_of =
            |k: &RunKey, dropped: u64| LogBatch { job_id: k.job_id.clone(), attempt: k.attempt, rank: k.rank, lines: Vec::new(), dropped, seq: 0 };
        let mut bytes = 0usize;
        for (key, line) in lines {
            let same = out.last().is_some_and(|b| b.job_id == key.job_id && b.attempt == key.attempt && b.rank == key.rank)
                && bytes + line.text.len() + line.target.len() <= MAX_BATCH_BYTES;
            if !same {
                bytes = 0;
            }
            bytes += line.text.len() + line.target.len();
            if !same {
                let n = match dropped.front() {
                    Some((k, n)) if **k == *key => {
                        let n = *n;
                        dropped.pop_front();
                        n
                    }
                    _ => 0,
                };
                out.push(batch_of(&key, n));
            }
            out.last_mut().expect("pushed above").lines.push(line);
        }
        // drops with no line after them (every line of theirs went)
        out.extend(dropped.into_iter().map(|(k, n)| batch_of(&k, n)));
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // a panic while holding the lock cannot leave the buffer inconsistent: keep going
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, line: LogLine) {
        let mut g = self.lock();
        let Some(key) = g.run.clone() else { return };
        g.bytes += size(&line);
        g.lines.push_back((key, line));
        g.bound();
    }
}

/// The event's message, then its other fields as `name=value`, as the worker's own log prints
/// them (fmt's default format).
#[derive(Default)]
struct Text {
    message: String,
    fields: String,
}

impl Visit for Text {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            self.record_debug(field, &value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }
}

impl<S: Subscriber> Layer<S> for LogCapture {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        // DEBUG and TRACE are "greater" than INFO
        if *meta.level() > Level::INFO || quiet(meta.target()) || self.lock().run.is_none() {
            return;
        }
        let mut text = Text::default();
        event.record(&mut text);
        let at_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        self.push(LogLine { at_ms, level: meta.level().to_string(), target: meta.target().to_string(), text: cut(text.message + &text.fields) });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::{debug, info, warn};
    use tracing_subscriber::prelude::*;

    /// A capture installed as `smelt worker` installs it (one subscriber for the process: here
    /// this thread's, and any thread `f` hands `dispatch` to), after `f` logged through it.
    fn logged(f: impl FnOnce(&LogCapture, &tracing::Dispatch)) -> LogCapture {
        let capture = LogCapture::new();
        let dispatch = tracing::Dispatch::new(tracing_subscriber::registry().with(capture.clone()));
        tracing::dispatcher::with_default(&dispatch, || f(&capture, &dispatch));
        capture
    }

    fn assignment(job: &str, attempt: u32, rank: u32) -> Assignment {
        Assignment { job_id: job.into(), attempt, rank, ..Default::default() }
    }

    fn texts(b: &LogBatch) -> Vec<&str> {
        b.lines.iter().map(|l| l.text.as_str()).collect()
    }

    #[test]
    fn lines_are_kept_only_during_a_run_and_tagged_with_it() {
        let capture = logged(|capture, dispatch| {
            info!("before any run");
            capture.begin(&assignment("job-000001", 2, 1));
            info!(step = 3, loss = 2.5, who = "rank one", "training started");
            warn!(error = %"disk full", "checkpoint not written");
            debug!("too fine to ship");
            tracing::info!(target: "h2::proto", "transport noise");
            // a line from another thread of the process belongs to the run too
            std::thread::scope(|s| {
                s.spawn(|| tracing::dispatcher::with_default(dispatch, || info!("from the uploader thread")));
            });
            capture.end();
            info!("between runs");
            capture.begin(&assignment("job-000002", 1, 0));
            info!("second run");
        });
        let batches = capture.drain();
        assert_eq!(batches.len(), 2, "{batches:?}");
        let b = &batches[0];
        assert_eq!((b.job_id.as_str(), b.attempt, b.rank, b.dropped), ("job-000001", 2, 1, 0));
        assert_eq!(texts(b), ["training started step=3 loss=2.5 who=\"rank one\"", "checkpoint not written error=disk full", "from the uploader thread"]);
        assert_eq!((b.lines[0].level.as_str(), b.lines[1].level.as_str()), ("INFO", "WARN"));
        assert_eq!(b.lines[0].target, module_path!());
        assert!(b.lines[0].at_ms > 1_700_000_000_000, "{}", b.lines[0].at_ms);
        assert_eq!((batches[1].job_id.as_str(), texts(&batches[1])), ("job-000002", vec!["second run"]));
        assert!(capture.drain().is_empty(), "drained lines are not sent twice");
    }

    #[test]
    fn long_lines_are_cut_and_batches_stay_under_a_megabyte() {
        let capture = logged(|capture, _| {
            capture.begin(&assignment("job-000001", 1, 0));
            let long = "x".repeat(100_000);
            for _ in 0..200 {
                info!("{long}");
            }
        });
        let batches = capture.drain();
        assert!(batches.len() >= 3, "{} batches", batches.len());
        for b in &batches {
            let bytes: usize = b.lines.iter().map(|l| l.text.len() + l.target.len()).sum();
            assert!(bytes <= MAX_BATCH_BYTES, "{bytes}");
            assert!(b.lines.iter().all(|l| l.text.len() <= MAX_LINE + 12 && l.text.ends_with(" [truncated]")));
        }
        assert_eq!(batches.iter().map(|b| b.lines.len()).sum::<usize>(), 200);
    }

    #[test]
    fn long_lines_fill_the_buffer_by_bytes() {
        let capture = logged(|capture, _| {
            capture.begin(&assignment("job-000001", 1, 0));
            let long = "z".repeat(MAX_LINE);
            for _ in 0..1000 {
                info!("{long}");
            }
        });
        let batches = capture.drain();
        let kept: usize = batches.iter().map(|b| b.lines.len()).sum();
        let bytes: usize = batches.iter().flat_map(|b| &b.lines).map(size).sum();
        assert!(bytes <= MAX_BUFFERED_BYTES && kept < 1000, "{kept} lines, {bytes} bytes");
        assert_eq!(batches[0].dropped as usize + kept, 1000);
    }

    #[test]
    fn batches_are_numbered_and_kept_until_acknowledged() {
        let capture = logged(|capture, _| {
            capture.begin(&assignment("job-000001", 1, 0));
            info!("first");
            let sent = capture.drain();
            assert_eq!(sent.iter().map(|b| (b.seq, texts(b))).collect::<Vec<_>>(), [(1, vec!["first"])]);
            info!("second");
            capture.begin(&assignment("job-000002", 1, 0));
            info!("third");
            let sent = capture.drain();
            assert_eq!(sent.iter().map(|b| b.seq).collect::<Vec<_>>(), [2, 3]);
            // none acknowledged: a new stream sends all three again, in order
            let again = capture.unacked();
            assert_eq!(again.iter().map(|b| (b.seq, texts(b))).collect::<Vec<_>>(), [(1, vec!["first"]), (2, vec!["second"]), (3, vec!["third"])]);
            capture.acked(2);
            assert_eq!(capture.unacked().iter().map(|b| b.seq).collect::<Vec<_>>(), [3]);
            // an old acknowledgement after a newer one changes nothing
            capture.acked(1);
            assert_eq!(capture.unacked().len(), 1);
            capture.acked(3);
            assert!(capture.unacked().is_empty());
            info!("fourth");
        });
        let batches = capture.drain();
        assert_eq!(batches.iter().map(|b| (b.seq, texts(b))).collect::<Vec<_>>(), [(4, vec!["fourth"])]);
        assert_eq!(capture.unacked_count(), 1);
        // a coordinator that does not acknowledge: what was sent is done, nothing is kept
        capture.keep_until_acked(false);
        assert_eq!(capture.unacked_count(), 0);
        let capture2 = logged(|c, _| {
            c.keep_until_acked(false);
            c.begin(&assignment("job-000001", 1, 0));
            info!("fifth");
            assert_eq!(c.drain().len(), 1);
            assert!(c.unacked().is_empty());
        });
        assert!(capture2.drain().is_empty());
        assert_eq!((quiet("h2"), quiet("h2::codec"), quiet("h2o::model"), quiet("smelt_worker::agent")), (true, true, false, false));
    }

    #[test]
    fn unacknowledged_batches_are_bounded_keeping_the_newest() {
        let capture = logged(|capture, _| {
            capture.begin(&assignment("job-000001", 1, 0));
            let long = "y".repeat(MAX_LINE);
            // a coordinator that never acknowledges: three times the byte bound goes out
            for _ in 0..3 {
                for _ in 0..MAX_BUFFERED_BYTES / MAX_LINE {
                    info!("{long}");
                }
                capture.drain();
            }
        });
        let kept = capture.unacked();
        let bytes: usize = kept.iter().map(batch_size).sum();
        assert!(bytes <= MAX_BUFFERED_BYTES && bytes > MAX_BUFFERED_BYTES / 2, "{bytes}");
        let last = kept.last().unwrap().seq;
        assert!(kept.windows(2).all(|w| w[1].seq == w[0].seq + 1), "the newest, in order");
        assert!(last > kept.len() as u64, "the oldest went");
    }

    #[test]
    fn a_full_buffer_drops_the_oldest_and_says_how_many() {
        let capture = logged(|capture, _| {
            capture.begin(&assignment("job-000001", 1, 0));
            for i in 0..MAX_BUFFERED + 5 {
                info!("line {i}");
            }
            capture.begin(&assignment("job-000001", 2, 0));
            info!("attempt two");
        });
        let batches = capture.drain();
        assert_eq!(batches.len(), 2);
        // the first run lost its 6 oldest lines (one more went to make room for attempt two's)
        assert_eq!(batches[0].dropped, 6);
        assert_eq!(batches[0].lines.len(), MAX_BUFFERED - 1);
        assert_eq!(batches[0].lines[0].text, "line 6");
        assert_eq!(batches[0].lines.last().unwrap().text, format!("line {}", MAX_BUFFERED + 4));
        assert_eq!((batches[1].attempt, batches[1].dropped, texts(&batches[1])), (2, 0, vec!["attempt two"]));
    }
}
