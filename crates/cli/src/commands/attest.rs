//! `attest`: verify SEV-SNP evidence from files, compute expected launch measurements, and
//! attest a running box (fresh nonce -> the agent's report -> full verification).

use std::time::SystemTime;

use anyhow::{Context, Result};
use microbox_attest::{Freshness, Policy, VekSource, VerifyRequest};

use super::Ctx;
use crate::cli::{AttestArgs, AttestCommand, Format};
use crate::UserError;

pub fn attest(ctx: &Ctx, args: AttestArgs) -> Result<()> {
    match args.command {
        Some(AttestCommand::Verify {
            report,
            vcek,
            cert_table,
            intermediate,
            policy,
            nonce,
            public_key,
            at,
            offline,
            format,
        }) => {
            let inputs = microbox_attest::VerifyInputs {
                report,
                vek: vcek,
                cert_table,
                intermediate,
                policy,
                nonce_hex: nonce,
                public_key,
                at,
                cache_dir: Some(cert_cache(ctx)),
                offline,
            };
            // Unreadable or malformed inputs are usage errors; a failing report is a verdict.
            let report = microbox_attest::verify_inputs(&inputs)
                .map_err(|e| UserError::new(format!("attest verify: {e}")))?;
            print_verdict(&report, format)
        }
        Some(AttestCommand::Measure {
            ovmf,
            kernel,
            initrd,
            append,
            vcpus,
            vcpu_type,
        }) => {
            let digest =
                microbox_attest::measure(&ovmf, &kernel, &initrd, &append, vcpus, &vcpu_type)?;
            println!("{}", hex::encode(digest));
            Ok(())
        }
        None => {
            let Some(target) = args.target else {
                return Err(UserError::new(
                    "give a box to attest, or a subcommand (see: microbox attest --help)",
                )
                .into());
            };
            attest_box(ctx, &target, args.policy.as_deref(), args.format)
        }
    }
}

fn cert_cache(ctx: &Ctx) -> std::path::PathBuf {
    ctx.root.join("cache/sev-certs")
}

fn load_policy(path: Option<&std::path::Path>) -> Result<Policy> {
    Ok(match path {
        Some(p) => Policy::from_file(p)?,
        None => Policy::default(),
    })
}

fn verify_and_print(
    raw: &[u8],
    vek: VekSource,
    policy: &Policy,
    freshness: Option<&Freshness>,
    at: SystemTime,
    format: Format,
) -> Result<()> {
    let report = microbox_attest::verify(&VerifyRequest {
        report: raw,
        vek,
        intermediate: None,
        policy,
        freshness,
        at,
    });
    print_verdict(&report, format)
}

/// Prints each check and the verdict; exit 0 only when every check passed.
fn print_verdict(report: &microbox_attest::Report, format: Format) -> Result<()> {
    match format {
        Format::Json => println!("{}", report.to_json()),
        Format::Table => {
            for line in report.render_lines() {
                println!("{line}");
            }
        }
    }
    if report.passed() {
        Ok(())
    } else {
        Err(UserError::with_code(
            format!("attestation failed: {}", report.failures().join(", ")),
            1,
        )
        .into())
    }
}

fn attest_box(
    ctx: &Ctx,
    key: &str,
    policy: Option<&std::path::Path>,
    format: Format,
) -> Result<()> {
    let store = ctx.boxes()?;
    let rec = store.observe(store.resolve(key)?);
    let sock = rec
        .agent_socket
        .clone()
        .filter(|_| rec.state.is_running())
        .ok_or_else(|| UserError::new(format!("box '{}' is not running", rec.name)))?;
    let policy = load_policy(policy)?;
    let nonce: [u8; 32] = rand::random();
    let freshness = Freshness {
        nonce: nonce.to_vec(),
        public_key: None,
    };
    let algo = policy
        .report_data_hashes
        .first()
        .copied()
        .unwrap_or(microbox_attest::HashAlgo::Sha512);
    let report_data = algo.report_data(&nonce, None);
    let evidence = ctx
        .tokio()?
        .block_on(async {
            let c = microbox_runtime::agent_client::AgentClient::connect_unix(&sock).await?;
            c.attestation_report(report_data)
                .await
                .map_err(anyhow::Error::from)
        })
        .with_context(|| format!("asking box '{}' for an attestation report", rec.name))?;
    let vek = if evidence.certs.is_empty() {
        VekSource::Kds {
            cache_dir: Some(cert_cache(ctx)),
        }
    } else {
        VekSource::CertTable(evidence.certs)
    };
    verify_and_print(
        &evidence.report,
        vek,
        &policy,
        Some(&freshness),
        SystemTime::now(),
        format,
    )
}
