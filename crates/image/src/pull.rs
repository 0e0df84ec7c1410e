//! Registry pulls with oci-client: auth, manifest/index resolution, parallel verified layer
//! downloads with retries and HTTP Range resume, and streaming diff_id verification.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use oci_client::client::{BlobResponse, ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use sha2::Digest as _;
use tokio::io::AsyncWriteExt;

use crate::docs::{self, Descriptor, Platform};
use crate::error::{Error, Result};
use crate::progress::{PullEvent, PullProgress};
use crate::reference::ImageRef;
use crate::store::{build_handle, ImageStore};
use crate::{auth, ImageHandle, PullOptions};

struct Ctx<'a> {
    client: Client,
    oci_ref: Reference,
    reference: String,
    opts: &'a PullOptions,
    progress: &'a dyn PullProgress,
}

fn registry_err(reference: &str, e: OciDistributionError) -> Error {
    let transient = match &e {
        OciDistributionError::RequestError(r) => {
            r.is_timeout() || r.is_connect() || r.is_request() || r.is_body() || r.is_decode()
        }
        OciDistributionError::ServerError { code, .. } => *code >= 500 || *code == 429,
        OciDistributionError::IoError(_) => true,
        _ => false,
    };
    Error::Registry {
        reference: reference.to_string(),
        message: e.to_string(),
        transient,
    }
}

fn is_transient(e: &Error) -> bool {
    matches!(
        e,
        Error::Registry {
            transient: true,
            ..
        }
    )
}

impl ImageStore {
    /// The stored image for `reference`, else pulls it.
    pub async fn ensure(
        &self,
        reference: &str,
        opts: &PullOptions,
        progress: &dyn PullProgress,
    ) -> Result<ImageHandle> {
        if let Some(h) = self.lookup(reference)? {
            return Ok(h);
        }
        self.pull(reference, opts, progress).await
    }

    /// Pulls `reference` into the store (blobs already stored are not fetched again) and tags
    /// it. Every blob is verified (digest, size, diff_id) before it becomes visible.
    pub async fn pull(
        &self,
        reference: &str,
        opts: &PullOptions,
        progress: &dyn PullProgress,
    ) -> Result<ImageHandle> {
        let image = ImageRef::parse(reference)?;
        let normalized = image.to_string();
        let want = match &opts.platform {
            Some(p) => Platform::parse(p)?,
            None => Platform::host(),
        };
        let mut config = ClientConfig {
            platform_resolver: None,
            connect_timeout: Some(Duration::from_secs(15)),
            read_timeout: Some(Duration::from_secs(60)),
            ..Default::default()
        };
        if image.allows_plain_http() {
            config.protocol = ClientProtocol::HttpsExcept(vec![image.registry().to_string()]);
        }
        let client = Client::new(config);
        let creds = match &opts.credentials {
            Some(c) => Some(c.clone()),
            None => auth::credentials_for(&self.root, image.registry())?,
        };
        let auth = match creds {
            Some(c) => RegistryAuth::Basic(c.username, c.password),
            None => RegistryAuth::Anonymous,
        };
        let ctx = Ctx {
            client,
            oci_ref: image.oci().clone(),
            reference: normalized.clone(),
            opts,
            progress,
        };
        // Prune must not delete blobs of a pull in flight.
        let _gc = self.lock_async("gc".into(), false).await?;

        retry(&ctx, "auth", || async {
            ctx.client
                .auth(&ctx.oci_ref, &auth, RegistryOperation::Pull)
                .await
                .map(|_| ())
                .map_err(|e| registry_err(&ctx.reference, e))
        })
        .await?;

        // Manifest (or index -> platform manifest).
        let (mut bytes, mut digest) = self.fetch_manifest(&ctx, &ctx.oci_ref, &auth).await?;
        if let Some(pinned) = image.digest() {
            if pinned != digest {
                return Err(Error::DigestMismatch {
                    what: format!("manifest of {normalized}"),
                    expected: pinned.into(),
                    actual: digest,
                });
            }
        }
        let mut platform_desc: Option<Platform> = None;
        if docs::is_index(&bytes) {
            let idx = docs::parse_index(&bytes, &digest)?;
            let chosen = idx
                .manifests
                .iter()
                .find(|d| d.platform.as_ref().is_some_and(|p| want.matches(p)))
                .ok_or_else(|| Error::NoMatchingPlatform {
                    reference: normalized.clone(),
                    platform: want.to_string(),
                    available: idx
                        .manifests
                        .iter()
                        .filter_map(|d| d.platform.as_ref().map(|p| p.to_string()))
                        .collect::<Vec<_>>()
                        .join(", "),
                })?
                .clone();
            let r = image.with_digest(&chosen.digest);
            let (b, d) = self.fetch_manifest(&ctx, &r, &auth).await?;
            if d != chosen.digest {
                return Err(Error::DigestMismatch {
                    what: format!("platform manifest of {normalized}"),
                    expected: chosen.digest.clone(),
                    actual: d,
                });
            }
            bytes = b;
            digest = d;
            platform_desc = chosen.platform;
        }
        let manifest = docs::parse_manifest(&bytes, &digest)?;

        // Config.
        let cdesc = manifest.config.clone();
        if !self.has_blob(&cdesc.digest, cdesc.size) {
            let _lock = self
                .lock_async(format!("blob-{}", &cdesc.digest[7..]), true)
                .await?;
            if !self.has_blob(&cdesc.digest, cdesc.size) {
                let cbytes = self.fetch_small_blob(&ctx, &cdesc, "image config").await?;
                self.put_blob("image config", &cdesc.digest, cdesc.size, &cbytes)?;
            }
        }
        let config = docs::parse_config(
            &self.read_blob(&cdesc.digest)?,
            &cdesc.digest,
            manifest.layers.len(),
        )?;
        let config_platform = Platform {
            os: config.os.clone(),
            architecture: config.architecture.clone(),
            variant: config.variant.clone(),
        };
        // A single-platform image must be what was asked for (an index entry's platform
        // is authoritative; the config's otherwise).
        if platform_desc.is_none() && opts.platform.is_some() && !want.matches(&config_platform) {
            return Err(Error::NoMatchingPlatform {
                reference: normalized.clone(),
                platform: want.to_string(),
                available: config_platform.to_string(),
            });
        }
        let platform = platform_desc.unwrap_or(config_platform);
        let mut handle = build_handle(&normalized, &digest, &manifest, &config);
        handle.platform = platform.to_string();
        progress.on_event(&PullEvent::Resolved {
            reference: normalized.clone(),
            manifest_digest: digest.clone(),
            layers: handle.layers.len(),
            total_bytes: handle.layers.iter().map(|l| l.size).sum(),
        });

        // Optionally build the rootfs while layers arrive: layer i is applied once it is
        // stored (verified) and layers below it are applied.
        let mut unpack = None;
        let mut signals = Vec::new();
        if opts.prepare_rootfs {
            let (txs, rxs): (Vec<_>, Vec<_>) = (0..handle.layers.len())
                .map(|_| std::sync::mpsc::channel::<()>())
                .unzip();
            signals = txs;
            let (store, h) = (self.clone(), handle.clone());
            unpack = Some(tokio::task::spawn_blocking(move || {
                store.rootfs_when_ready(&h, &mut |i| {
                    rxs[i].recv().map_err(|_| {
                        Error::NotFound(format!("layer {} (the pull failed)", h.layers[i].digest))
                    })
                })
            }));
        }

        // Layers, in parallel.
        let jobs = handle.layers.iter().enumerate().map(|(i, l)| {
            let ctx = &ctx;
            let signal = signals.get(i).cloned();
            async move {
                self.fetch_layer(ctx, l).await?;
                if let Some(s) = signal {
                    let _ = s.send(());
                }
                Ok::<(), Error>(())
            }
        });
        futures::stream::iter(jobs)
            .buffer_unordered(opts.max_concurrent_downloads.max(1))
            .try_collect::<Vec<()>>()
            .await?;
        drop(signals);

        // Manifest last: a tagged image's blobs are all present.
        self.put_blob("manifest", &digest, bytes.len() as u64, &bytes)?;
        self.tag(
            &normalized,
            Descriptor {
                media_type: manifest
                    .media_type
                    .clone()
                    .unwrap_or_else(|| docs::OCI_MANIFEST.into()),
                digest: digest.clone(),
                size: bytes.len() as u64,
                platform: Some(platform),
                annotations: None,
            },
        )?;
        if let Some(task) = unpack {
            task.await.expect("rootfs task panicked")?;
        }
        progress.on_event(&PullEvent::Done {
            reference: normalized,
        });
        Ok(handle)
    }

    async fn fetch_manifest(
        &self,
        ctx: &Ctx<'_>,
        r: &Reference,
        auth: &RegistryAuth,
    ) -> Result<(Vec<u8>, String)> {
        let (bytes, _) = retry(ctx, "manifest", || async {
            ctx.client
                .pull_manifest_raw(r, auth, docs::ACCEPTED)
                .await
                .map_err(|e| registry_err(&ctx.reference, e))
        })
        .await?;
        if bytes.len() > 4 << 20 {
            return Err(Error::InvalidDocument {
                what: "manifest".into(),
                digest: r.whole(),
                reason: format!("{} bytes is larger than the 4 MiB limit", bytes.len()),
            });
        }
        // Our own digest of the bytes, never the registry's header.
        let digest = docs::sha256_digest(&bytes);
        Ok((bytes.to_vec(), digest))
    }

    async fn fetch_small_blob(&self, ctx: &Ctx<'_>, d: &Descriptor, what: &str) -> Result<Vec<u8>> {
        if d.size > 16 << 20 {
            return Err(Error::InvalidDocument {
                what: what.into(),
                digest: d.digest.clone(),
                reason: format!("size {} is larger than the 16 MiB limit", d.size),
            });
        }
        retry(ctx, what, || async {
            let resp = ctx
                .client
                .pull_blob_stream_partial(&ctx.oci_ref, d.digest.as_str(), 0, None)
                .await
                .map_err(|e| registry_err(&ctx.reference, e))?;
            let mut s = match resp {
                BlobResponse::Full(s) | BlobResponse::Partial(s) => s,
            };
            let mut out = Vec::with_capacity(d.size as usize);
            while let Some(chunk) = s.next().await {
                match chunk {
                    Ok(c) => {
                        out.extend_from_slice(&c);
                        if out.len() as u64 > d.size {
                            break;
                        }
                    }
                    // Trailing verification errors are re-detected by put_blob.
                    Err(_) if out.len() as u64 >= d.size => break,
                    Err(e) => {
                        return Err(Error::Registry {
                            reference: ctx.reference.clone(),
                            message: format!("{what} {}: {e}", d.digest),
                            transient: true,
                        })
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    async fn fetch_layer(&self, ctx: &Ctx<'_>, l: &crate::LayerInfo) -> Result<()> {
        let done = |cached| {
            ctx.progress.on_event(&PullEvent::LayerDone {
                digest: l.digest.clone(),
                cached,
            })
        };
        ctx.progress.on_event(&PullEvent::LayerStart {
            digest: l.digest.clone(),
            size: l.size,
        });
        if self.has_blob(&l.digest, l.size) {
            done(true);
            return Ok(());
        }
        // One downloader per blob across processes; the others wait, then find it stored.
        let _lock = self
            .lock_async(format!("blob-{}", &l.digest[7..]), true)
            .await?;
        if self.has_blob(&l.digest, l.size) {
            done(true);
            return Ok(());
        }
        let mut dl = Download::new(self, l)?;
        let mut attempt = 0;
        loop {
            match dl.run(ctx).await {
                Ok(()) => break,
                Err(e) if is_transient(&e) && attempt < ctx.opts.retries => {
                    attempt += 1;
                    ctx.progress.on_event(&PullEvent::LayerRetry {
                        digest: l.digest.clone(),
                        attempt,
                        error: e.to_string(),
                    });
                    tokio::time::sleep(Duration::from_millis(200 << attempt.min(5))).await;
                }
                Err(e) => return Err(e),
            }
        }
        dl.finish(self).await?;
        done(false);
        Ok(())
    }
}

async fn retry<T, F, Fut>(ctx: &Ctx<'_>, what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut attempt = 0;
    loop {
        match f().await {
            Err(e) if is_transient(&e) && attempt < ctx.opts.retries => {
                attempt += 1;
                tracing::warn!(what, attempt, "transient registry error, retrying: {e}");
                tokio::time::sleep(Duration::from_millis(200 << attempt.min(5))).await;
            }
            r => return r,
        }
    }
}

/// State of one layer download, kept across retries so a resumed download continues hashing.
struct Download {
    layer: crate::LayerInfo,
    tmp: tempfile::NamedTempFile,
    file: tokio::fs::File,
    sha: sha2::Sha256,
    written: u64,
    diff: DiffIdPipe,
}

/// Decompresses the bytes on a blocking thread as they arrive and hashes the tar (the diff_id).
struct DiffIdPipe {
    tx: Option<tokio::sync::mpsc::Sender<bytes::Bytes>>,
    task: tokio::task::JoinHandle<std::io::Result<String>>,
}

impl DiffIdPipe {
    fn new() -> DiffIdPipe {
        let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(64);
        let task = tokio::task::spawn_blocking(move || {
            let reader = ChannelReader {
                rx,
                cur: bytes::Bytes::new(),
            };
            let mut r = crate::extract::decompress(reader)?;
            let mut h = sha2::Sha256::new();
            std::io::copy(&mut r, &mut h)?;
            // Drain trailing bytes so the sender never blocks on a full channel.
            let mut rest = r;
            std::io::copy(&mut rest, &mut std::io::sink())?;
            Ok(format!("sha256:{}", hex::encode(h.finalize())))
        });
        DiffIdPipe { tx: Some(tx), task }
    }

    async fn feed(&self, b: bytes::Bytes) {
        if let Some(tx) = &self.tx {
            // A send error means the decompressor stopped (bad data); `finish` reports it.
            let _ = tx.send(b).await;
        }
    }

    async fn finish(mut self) -> std::io::Result<String> {
        self.tx.take();
        self.task.await.expect("diff_id task panicked")
    }
}

struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    cur: bytes::Bytes,
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(b) => self.cur = b,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        bytes::Buf::advance(&mut self.cur, n);
        Ok(n)
    }
}

impl Download {
    fn new(store: &ImageStore, l: &crate::LayerInfo) -> Result<Download> {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("blob-{}-", &l.digest[7..19]))
            .tempfile_in(store.tmp_dir())
            .map_err(Error::io("create temp file", store.tmp_dir()))?;
        let file = tokio::fs::File::from_std(
            tmp.reopen()
                .map_err(Error::io("open temp file", tmp.path()))?,
        );
        Ok(Download {
            layer: l.clone(),
            tmp,
            file,
            sha: sha2::Sha256::new(),
            written: 0,
            diff: DiffIdPipe::new(),
        })
    }

    async fn reset(&mut self) -> Result<()> {
        self.file
            .set_len(0)
            .await
            .map_err(Error::io("truncate", self.tmp.path()))?;
        self.file = tokio::fs::File::from_std(
            self.tmp
                .reopen()
                .map_err(Error::io("open temp file", self.tmp.path()))?,
        );
        self.sha = sha2::Sha256::new();
        self.written = 0;
        let old = std::mem::replace(&mut self.diff, DiffIdPipe::new());
        let _ = old.finish().await;
        Ok(())
    }

    async fn run(&mut self, ctx: &Ctx<'_>) -> Result<()> {
        let l = self.layer.clone();
        // Resume with Range after a partial transfer; a plain GET otherwise.
        let resp = if self.written == 0 {
            ctx.client
                .pull_blob_stream(&ctx.oci_ref, l.digest.as_str())
                .await
                .map(BlobResponse::Full)
        } else {
            ctx.client
                .pull_blob_stream_partial(&ctx.oci_ref, l.digest.as_str(), self.written, None)
                .await
        }
        .map_err(|e| registry_err(&ctx.reference, e))?;
        let mut stream = match resp {
            BlobResponse::Partial(s) if self.written > 0 => s,
            BlobResponse::Partial(s) | BlobResponse::Full(s) => {
                if self.written > 0 {
                    // The registry ignored Range: start over.
                    self.reset().await?;
                }
                s
            }
        };
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                // oci-client's own verifier errors after the last byte; ours decides.
                Err(_) if self.written == l.size => break,
                Err(e) => {
                    return Err(Error::Registry {
                        reference: ctx.reference.clone(),
                        message: format!("layer {}: {e}", l.digest),
                        transient: true,
                    })
                }
            };
            if self.written + chunk.len() as u64 > l.size {
                return Err(Error::SizeMismatch {
                    what: "layer".into(),
                    digest: l.digest.clone(),
                    expected: l.size,
                    actual: self.written + chunk.len() as u64,
                });
            }
            self.sha.update(&chunk);
            self.file
                .write_all(&chunk)
                .await
                .map_err(Error::io("write", self.tmp.path()))?;
            self.written += chunk.len() as u64;
            ctx.progress.on_event(&PullEvent::LayerAdvance {
                digest: l.digest.clone(),
                bytes: chunk.len() as u64,
            });
            self.diff.feed(chunk).await;
        }
        if self.written < l.size {
            return Err(Error::Registry {
                reference: ctx.reference.clone(),
                message: format!(
                    "layer {}: connection ended after {} of {} bytes",
                    l.digest, self.written, l.size
                ),
                transient: true,
            });
        }
        Ok(())
    }

    async fn finish(mut self, store: &ImageStore) -> Result<()> {
        let l = self.layer.clone();
        let actual = format!("sha256:{}", hex::encode(self.sha.clone().finalize()));
        let diff = std::mem::replace(
            &mut self.diff,
            DiffIdPipe {
                tx: None,
                task: tokio::task::spawn_blocking(|| Ok(String::new())),
            },
        );
        let diff_id = diff.finish().await;
        if actual != l.digest {
            return Err(Error::DigestMismatch {
                what: format!("layer {}", l.digest),
                expected: l.digest.clone(),
                actual,
            });
        }
        let diff_id = diff_id.map_err(|e| Error::Layer {
            layer: l.digest.clone(),
            entry: String::new(),
            reason: format!("cannot decompress: {e}"),
        })?;
        if diff_id != l.diff_id {
            return Err(Error::DigestMismatch {
                what: format!("uncompressed layer {} (config rootfs.diff_ids)", l.digest),
                expected: l.diff_id.clone(),
                actual: diff_id,
            });
        }
        self.file
            .flush()
            .await
            .map_err(Error::io("flush", self.tmp.path()))?;
        self.file
            .sync_all()
            .await
            .map_err(Error::io("sync", self.tmp.path()))?;
        let dest = store.blob_path(&l.digest)?;
        std::fs::set_permissions(
            self.tmp.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )
        .map_err(Error::io("chmod", self.tmp.path()))?;
        self.tmp
            .persist(&dest)
            .map_err(|e| Error::io("rename blob into place", &dest)(e.error))?;
        Ok(())
    }
}
