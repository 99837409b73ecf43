//! Results appended to a file as JSON lines; flushed per batch.

use futures::future::BoxFuture;
use sluice_crds::StdoutFormat;
use tokio::io::AsyncWriteExt;

use super::{Sink, SinkError, render};
use crate::message::Message;

pub struct FileSink {
    path: String,
    format: StdoutFormat,
    file: Option<tokio::fs::File>,
    buf: Vec<u8>,
}

impl FileSink {
    pub fn new(path: impl Into<String>, format: StdoutFormat) -> Self {
        Self { path: path.into(), format, file: None, buf: Vec::new() }
    }
}

impl Sink for FileSink {
    fn write<'a>(&'a mut self, batch: &'a [Message]) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let err = |source| SinkError::Io { target: self.path.clone(), source };
            if self.file.is_none() {
                let f = tokio::fs::OpenOptions::new().create(true).append(true).open(&self.path).await.map_err(err)?;
                self.file = Some(f);
            }
            self.buf.clear();
            for m in batch {
                render(m, self.format, &mut self.buf);
            }
            if let Some(f) = &mut self.file {
                f.write_all(&self.buf).await.map_err(err)?;
                f.flush().await.map_err(err)?;
            }
            Ok(())
        })
    }

    fn kind(&self) -> &'static str {
        "file"
    }
}
