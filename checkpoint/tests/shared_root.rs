//! Two writers under one checkpoint root: a rank 0 still saving its rescue checkpoint while the
//! job's next attempt commits newer steps (after a coordinator restart, or a wait that ran out).
//! Neither may commit a checkpoint over files the other's retention swept.

mod common;

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use common::*;
use futures::stream::BoxStream;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, ObjectStoreExt, PutMultipartOptions, PutOptions,
    PutPayload, PutResult,
};
use smelt_checkpoint::layout::{MANIFEST, MODEL, TRAINER};
use smelt_checkpoint::read::{list_steps, load_verified_dir};
use smelt_checkpoint::{commit, CheckpointError, UploadOptions};
use smelt_corpus::StoreDir;

/// What the other writer does to this step's model.safetensors, and when.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Interference {
    /// Deleted as the step's trainer.json (its last data file) goes up: a retention pass that
    /// swept the upload in progress.
    SweptBeforeManifest,
    /// Written again with other bytes of the same size as trainer.json goes up: a writer of the
    /// same step.
    OverwrittenBeforeManifest,
    /// Deleted just after the manifest went up.
    SweptAfterManifest,
}

/// An in-memory store where another writer interferes with a step's upload.
#[derive(Debug)]
struct SweptMidUpload {
    inner: Arc<InMemory>,
    what: Interference,
}

impl fmt::Display for SweptMidUpload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SweptMidUpload({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for SweptMidUpload {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> object_store::Result<PutResult> {
        let parts: Vec<_> = location.parts().collect();
        let model = Path::from_iter(parts[..parts.len() - 1].iter().cloned()).join(MODEL);
        let file = location.filename().map(str::to_string);
        if file.as_deref() == Some(TRAINER) {
            match self.what {
                Interference::SweptBeforeManifest => self.inner.delete(&model).await?,
                Interference::OverwrittenBeforeManifest => {
                    let mut bytes = self.inner.get(&model).await?.bytes().await?.to_vec();
                    let last = bytes.len() - 1;
                    bytes[last] ^= 1;
                    self.inner.put(&model, bytes.into()).await?;
                }
                Interference::SweptAfterManifest => {}
            }
        }
        let r = self.inner.put_opts(location, payload, opts).await?;
        if file.as_deref() == Some(MANIFEST) && self.what == Interference::SweptAfterManifest {
            self.inner.delete(&model).await?;
        }
        Ok(r)
    }
    async fn put_multipart_opts(&self, location: &Path, opts: PutMultipartOptions) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }
    async fn get_opts(&self, location: &Path, options: GetOptions) -> object_store::Result<GetResult> {
        self.inner.get_opts(location, options).await
    }
    fn delete_stream(&self, locations: BoxStream<'static, object_store::Result<Path>>) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }
    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }
    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }
    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

#[test]
fn a_file_swept_or_overwritten_by_another_writer_stops_the_commit_and_names_the_file() {
    let cfg = config(64, 16);
    for (what, says) in [
        (Interference::SweptBeforeManifest, "model.safetensors: written for this checkpoint but is gone"),
        (Interference::OverwrittenBeforeManifest, "model.safetensors: written for this checkpoint but was written again (ETag"),
        (Interference::SweptAfterManifest, "model.safetensors: written for this checkpoint but is gone"),
    ] {
        let inner = Arc::new(InMemory::new());
        let store = SweptMidUpload { inner: inner.clone(), what };
        let swept = StoreDir::from_parts(Arc::new(store), Path::from("ckpt"), "memory://shared/ckpt");
        let e = commit(&swept, &snapshot(&cfg, 20), &UploadOptions::default()).unwrap_err();
        assert!(matches!(e, CheckpointError::Vanished { .. }), "{what:?}: {e}");
        assert!(e.to_string().contains(&format!("memory://shared/ckpt/00000020/{says}")), "{what:?}: {e}");
        // nothing committed (a manifest that went up is taken back): no checkpoint that cannot load
        let plain = StoreDir::from_parts(inner, Path::from("ckpt"), "memory://shared/ckpt");
        assert_eq!(list_steps(&plain).unwrap().into_iter().collect::<Vec<_>>(), [(20, false)], "{what:?}");
        assert_eq!(plain.size(&format!("00000020/{MANIFEST}")).unwrap(), None, "{what:?}");
        // the step can still be committed whole (by the next writer, or a retry)
        let c = commit(&plain, &snapshot(&cfg, 20), &UploadOptions::default()).unwrap();
        assert!(c.uri.ends_with("/00000020"), "{}", c.uri);
        let back = load_verified_dir(&plain.join("00000020")).unwrap();
        assert_eq!(back.params, snapshot(&cfg, 20).params);
    }
}
