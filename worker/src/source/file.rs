//! JSON lines from a file or stdin (`-`): one message per line, partition 0,
//! offset = line number (from 0). Blank lines are skipped but keep their
//! number, so offsets always name the line.

use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::io::{AsyncBufReadExt, BufReader};

use super::{Acker, MemoryAcker, Source, SourceError, SourceEvent};
use crate::message::{Message, now_ms};

pub struct FileSource {
    path: String,
    lines: Option<tokio::io::Lines<BufReader<Box<dyn tokio::io::AsyncRead + Send + Unpin>>>>,
    line: i64,
    announced: bool,
    acker: Arc<MemoryAcker>,
}

impl FileSource {
    /// `path` is a file, or `-` for stdin. Opens lazily, on the first read.
    pub fn new(path: impl Into<String>) -> Self {
        Self { path: path.into(), lines: None, line: 0, announced: false, acker: Arc::new(MemoryAcker::default()) }
    }

    pub fn memory_acker(&self) -> Arc<MemoryAcker> {
        self.acker.clone()
    }

    async fn open(&mut self) -> Result<(), SourceError> {
        let reader: Box<dyn tokio::io::AsyncRead + Send + Unpin> = if self.path == "-" {
            Box::new(tokio::io::stdin())
        } else {
            let f = tokio::fs::File::open(&self.path)
                .await
                .map_err(|source| SourceError::Io { path: self.path.clone(), source })?;
            Box::new(f)
        };
        self.lines = Some(BufReader::with_capacity(1 << 16, reader).lines());
        Ok(())
    }
}

impl Source for FileSource {
    fn next(&mut self, max: usize) -> BoxFuture<'_, Result<SourceEvent, SourceError>> {
        Box::pin(async move {
            if !self.announced {
                self.announced = true;
                self.open().await?;
                return Ok(SourceEvent::Assigned(vec![0]));
            }
            let Some(lines) = &mut self.lines else { return Ok(SourceEvent::End) };
            let mut batch = Vec::new();
            while batch.len() < max.max(1) {
                let line =
                    lines.next_line().await.map_err(|source| SourceError::Io { path: self.path.clone(), source })?;
                let Some(line) = line else { break };
                let offset = self.line;
                self.line += 1;
                if line.trim().is_empty() {
                    continue;
                }
                batch.push(Message::new(0, offset, line.into_bytes()).with_timestamp(now_ms()));
            }
            if batch.is_empty() {
                self.lines = None;
                return Ok(SourceEvent::End);
            }
            Ok(SourceEvent::Batch(batch))
        })
    }

    fn acker(&self) -> Arc<dyn Acker> {
        self.acker.clone()
    }

    fn kind(&self) -> &'static str {
        "file"
    }
}
