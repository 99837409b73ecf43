//! Results to stdout, one JSON object per line (the payload, or an envelope
//! with key, partition, offset and headers). Stdout is locked per batch and
//! flushed before the batch counts as delivered.

use std::io::Write;

use futures::future::BoxFuture;
use sluice_crds::StdoutFormat;

use super::{Sink, SinkError, render};
use crate::message::Message;

pub struct StdoutSink {
    format: StdoutFormat,
    stderr: bool,
    buf: Vec<u8>,
}

impl StdoutSink {
    pub fn new(format: StdoutFormat) -> Self {
        Self { format, stderr: false, buf: Vec::new() }
    }

    /// Dead letters next to results on a terminal go to stderr.
    pub fn stderr(format: StdoutFormat) -> Self {
        Self { format, stderr: true, buf: Vec::new() }
    }
}

impl Sink for StdoutSink {
    fn write<'a>(&'a mut self, batch: &'a [Message]) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            self.buf.clear();
            for m in batch {
                render(m, self.format, &mut self.buf);
            }
            let res = if self.stderr {
                let mut e = std::io::stderr().lock();
                e.write_all(&self.buf).and_then(|()| e.flush())
            } else {
                let mut o = std::io::stdout().lock();
                o.write_all(&self.buf).and_then(|()| o.flush())
            };
            res.map_err(|source| SinkError::Io { target: if self.stderr { "stderr" } else { "stdout" }.into(), source })
        })
    }

    fn kind(&self) -> &'static str {
        "stdout"
    }
}
