//! Image commands: pull, images, rmi, image inspect/check/unpack/import/prune, login/logout.

use std::io::Read;
use std::path::Path;

use anyhow::Result;
use microbox_image::{Credentials, ImageHandle, ImageStore, PullOptions};

use super::Ctx;
use crate::cli::Format;
use crate::progress::PullBars;
use crate::UserError;

fn store(ctx: &Ctx) -> Result<ImageStore> {
    Ok(ImageStore::open(&ctx.root)?)
}

fn options(platform: Option<&str>) -> PullOptions {
    PullOptions {
        platform: platform.map(str::to_owned),
        ..Default::default()
    }
}

/// The stored image for `reference`, pulled (with progress) when missing.
pub async fn ensure(ctx: &Ctx, reference: &str, platform: Option<&str>) -> Result<ImageHandle> {
    let store = store(ctx)?;
    if let Some(h) = store.lookup(reference)? {
        if platform.is_none_or(|p| p == h.platform) {
            return Ok(h);
        }
    }
    logged_pull(ctx, &store, reference, platform).await
}

/// Pulls with progress and records the pull in the pull log (for metrics), success or not.
async fn logged_pull(
    ctx: &Ctx,
    store: &ImageStore,
    reference: &str,
    platform: Option<&str>,
) -> Result<ImageHandle> {
    let bars = PullBars::new();
    let start = std::time::Instant::now();
    let result = store.pull(reference, &options(platform), &bars).await;
    let rec = microbox_runtime::eventlog::PullRecord {
        time_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        reference: reference.to_string(),
        ok: result.is_ok(),
        bytes: bars.bytes.load(std::sync::atomic::Ordering::Relaxed),
        duration_ms: start.elapsed().as_millis() as u64,
        layers_cached: bars.cached.load(std::sync::atomic::Ordering::Relaxed),
        layers_downloaded: bars.downloaded.load(std::sync::atomic::Ordering::Relaxed),
    };
    if let Err(e) = microbox_runtime::eventlog::append_json(
        &microbox_runtime::eventlog::pulls_path(&ctx.root),
        &rec,
    ) {
        tracing::warn!("writing the pull log: {e}");
    }
    Ok(result?)
}

pub fn pull(ctx: &Ctx, reference: &str, platform: Option<&str>) -> Result<()> {
    let store = store(ctx)?;
    let h = ctx
        .tokio()?
        .block_on(logged_pull(ctx, &store, reference, platform))?;
    println!("{} {}", h.reference, h.manifest_digest);
    Ok(())
}

pub fn list(ctx: &Ctx, format: Format) -> Result<()> {
    let images = store(ctx)?.list()?;
    if format == Format::Json {
        println!("{}", serde_json::to_string_pretty(&images)?);
        return Ok(());
    }
    println!(
        "{:<50}  {:<14}  {:<12}  {:>10}  LAYERS",
        "REFERENCE", "IMAGE ID", "PLATFORM", "SIZE"
    );
    for i in images {
        let id = i.config_digest.trim_start_matches("sha256:");
        println!(
            "{:<50}  {:<14}  {:<12}  {:>10}  {}",
            i.reference,
            &id[..id.len().min(12)],
            i.platform,
            indicatif::HumanBytes(i.size).to_string(),
            i.layers
        );
    }
    Ok(())
}

/// `rmi`: like Docker, refuses an image that boxes were created from, unless forced.
pub fn remove(ctx: &Ctx, references: &[String], force: bool) -> Result<()> {
    let store = store(ctx)?;
    let boxes = ctx.boxes()?.list()?;
    for r in references {
        let wanted = microbox_image::ImageRef::parse(r)?.to_string();
        if let Some(b) = boxes.iter().find(|b| b.image == wanted).filter(|_| !force) {
            return Err(UserError::new(format!(
                "image '{r}' is used by box '{}' (remove the box first, or use: microbox rmi -f {r})",
                b.name
            ))
            .into());
        }
        store.remove(r)?;
        println!("untagged {r}");
    }
    Ok(())
}

fn require(store: &ImageStore, reference: &str) -> Result<ImageHandle> {
    store.lookup(reference)?.ok_or_else(|| {
        UserError::new(format!("no such image '{reference}' (see: microbox images; get it with: microbox pull {reference})")).into()
    })
}

pub fn inspect(ctx: &Ctx, reference: &str) -> Result<()> {
    let store = store(ctx)?;
    let h = require(&store, reference)?;
    println!("{}", serde_json::to_string_pretty(&h)?);
    Ok(())
}

pub fn check(ctx: &Ctx) -> Result<()> {
    let report = store(ctx)?.check()?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    if report.is_clean() {
        Ok(())
    } else {
        Err(UserError::new(
            "the image store is damaged (see the report above; re-pull the affected images)",
        )
        .into())
    }
}

pub fn unpack(ctx: &Ctx, reference: &str, dest: &Path) -> Result<()> {
    let store = store(ctx)?;
    let h = require(&store, reference)?;
    store.unpack(&h, dest)?;
    println!("{}", dest.display());
    Ok(())
}

pub fn import(ctx: &Ctx, path: &Path, reference: Option<&str>) -> Result<()> {
    let h = store(ctx)?.import(path, reference)?;
    println!("{} {}", h.reference, h.manifest_digest);
    Ok(())
}

pub fn prune(ctx: &Ctx) -> Result<()> {
    let report = store(ctx)?.prune()?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

pub fn login(
    ctx: &Ctx,
    server: &str,
    username: &str,
    password: Option<String>,
    stdin: bool,
) -> Result<()> {
    let password = match (password, stdin) {
        (Some(p), _) => p,
        (None, true) => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s)?;
            s.trim_end_matches(['\n', '\r']).to_string()
        }
        (None, false) => {
            return Err(UserError::new("give the password with --password-stdin (or -p, which leaves it in your shell history)").into())
        }
    };
    let creds = Credentials {
        username: username.to_string(),
        password,
    };
    microbox_image::auth::login(&ctx.root, server, &creds)?;
    println!(
        "Login credentials for {server} stored in {}",
        microbox_image::auth::auth_file(&ctx.root).display()
    );
    Ok(())
}

pub fn logout(ctx: &Ctx, server: &str) -> Result<()> {
    if microbox_image::auth::logout(&ctx.root, server)? {
        println!("Removed credentials for {server}");
        Ok(())
    } else {
        Err(UserError::new(format!("not logged in to {server}")).into())
    }
}
