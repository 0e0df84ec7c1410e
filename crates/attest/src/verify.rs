//! Verification of one SEV-SNP report: every step becomes a [`Check`] in a [`Report`], so the
//! CLI can print each check and a verdict. `verify` never stops at the first problem unless
//! later checks cannot run without the earlier result.

use crate::certs::{self, VekKind};
use crate::policy::{Freshness, Policy};
use crate::product::{fingerprint, Product, ALL_PRODUCTS};
use crate::report::{SigningKey, SnpReport, Tcb};
use crate::vek::{self, VekSource};
use serde::Serialize;
use std::fmt;
use std::time::SystemTime;
use x509_cert::Certificate;

/// Outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The check ran and succeeded.
    Pass,
    /// The check ran and failed, or could not run although it is required.
    Fail,
    /// Not applicable or not requested (e.g. no expected measurement in the policy).
    Skip,
}

/// Overall result: pass only if no check failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Every check passed or was skipped as not applicable.
    Pass,
    /// At least one check failed.
    Fail,
}

/// One verification step.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Stable identifier, e.g. `chain.ark`, `report.signature`, `policy.debug`.
    pub id: String,
    /// Outcome.
    pub status: Status,
    /// What was compared, in words.
    pub detail: String,
}

/// The result of [`verify()`]: serializable to JSON, printable line by line.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Overall verdict.
    pub verdict: Verdict,
    /// Product the report was attributed to.
    pub product: Option<Product>,
    /// Report format version.
    pub report_version: Option<u32>,
    /// Key that signed the report.
    pub signing_key: Option<SigningKey>,
    /// Launch measurement (hex).
    pub measurement: Option<String>,
    /// REPORTED_TCB.
    pub reported_tcb: Option<Tcb>,
    /// Where the VEK came from.
    pub vek_origin: Option<String>,
    /// The time certificate validity was checked at (RFC 3339).
    pub checked_at: String,
    /// Every check, in order.
    pub checks: Vec<Check>,
}

impl Report {
    /// True when the verdict is pass.
    pub fn passed(&self) -> bool {
        self.verdict == Verdict::Pass
    }

    /// The check with this id, if it ran.
    pub fn check(&self, id: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.id == id)
    }

    /// Ids of failed checks.
    pub fn failures(&self) -> Vec<&str> {
        self.checks
            .iter()
            .filter(|c| c.status == Status::Fail)
            .map(|c| c.id.as_str())
            .collect()
    }

    /// Pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// One line per check plus a verdict line.
    pub fn render_lines(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .checks
            .iter()
            .map(|c| {
                let tag = match c.status {
                    Status::Pass => "PASS",
                    Status::Fail => "FAIL",
                    Status::Skip => "skip",
                };
                format!("{tag}  {:<22} {}", c.id, c.detail)
            })
            .collect();
        let count = |s| self.checks.iter().filter(|c| c.status == s).count();
        out.push(format!(
            "verdict: {} ({} passed, {} failed, {} skipped)",
            match self.verdict {
                Verdict::Pass => "PASS",
                Verdict::Fail => "FAIL",
            },
            count(Status::Pass),
            count(Status::Fail),
            count(Status::Skip)
        ));
        out
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for l in self.render_lines() {
            writeln!(f, "{l}")?;
        }
        Ok(())
    }
}

/// Inputs of [`verify()`].
#[derive(Debug, Clone)]
pub struct VerifyRequest<'a> {
    /// The raw 1184-byte report.
    pub report: &'a [u8],
    /// Where the VCEK/VLEK comes from.
    pub vek: VekSource,
    /// An ASK/ASVK supplied by the caller (DER or PEM), used when none is pinned (Milan ASVK)
    /// and trusted only if the pinned ARK signed it.
    pub intermediate: Option<Vec<u8>>,
    /// The policy to apply.
    pub policy: &'a Policy,
    /// The verifier's nonce (and public key); without it freshness is reported as skipped.
    pub freshness: Option<&'a Freshness>,
    /// Time at which certificates must be valid (normally now).
    pub at: SystemTime,
}

struct Ctx {
    checks: Vec<Check>,
}

impl Ctx {
    fn push(&mut self, id: &str, status: Status, detail: impl Into<String>) {
        self.checks.push(Check {
            id: id.to_string(),
            status,
            detail: detail.into(),
        });
    }
    fn pass(&mut self, id: &str, d: impl Into<String>) {
        self.push(id, Status::Pass, d)
    }
    fn fail(&mut self, id: &str, d: impl Into<String>) {
        self.push(id, Status::Fail, d)
    }
    fn skip(&mut self, id: &str, d: impl Into<String>) {
        self.push(id, Status::Skip, d)
    }
    fn result(&mut self, id: &str, r: Result<String, String>) -> bool {
        match r {
            Ok(d) => {
                self.pass(id, d);
                true
            }
            Err(d) => {
                self.fail(id, d);
                false
            }
        }
    }
}

/// Verifies a report end to end. See the crate docs for the steps.
pub fn verify(req: &VerifyRequest<'_>) -> Report {
    let mut ctx = Ctx { checks: Vec::new() };
    let mut out = Report {
        verdict: Verdict::Fail,
        product: None,
        report_version: None,
        signing_key: None,
        measurement: None,
        reported_tcb: None,
        vek_origin: None,
        checked_at: humantime::format_rfc3339_seconds(req.at).to_string(),
        checks: Vec::new(),
    };
    run(req, &mut ctx, &mut out);
    out.checks = ctx.checks;
    out.verdict = if out.checks.iter().any(|c| c.status == Status::Fail) || out.checks.is_empty() {
        Verdict::Fail
    } else {
        Verdict::Pass
    };
    out
}

fn run(req: &VerifyRequest<'_>, ctx: &mut Ctx, out: &mut Report) {
    // 1. Parse.
    let report = match SnpReport::from_bytes(req.report) {
        Ok(r) => r,
        Err(e) => return ctx.fail("report.parse", e.to_string()),
    };
    out.report_version = Some(report.version());
    out.measurement = Some(hex::encode(report.measurement()));
    let key = match report.signing_key() {
        Ok(SigningKey::None) => {
            ctx.fail(
                "report.parse",
                "the report is unsigned (KEY_INFO has MASK_CHIP_KEY set or SIGNING_KEY = none)",
            );
            return;
        }
        Ok(k) => k,
        Err(e) => return ctx.fail("report.parse", e.to_string()),
    };
    out.signing_key = Some(key);
    ctx.pass(
        "report.parse",
        format!(
            "version {}, signed by {}, VMPL {}",
            report.version(),
            if key == SigningKey::Vlek {
                "VLEK"
            } else {
                "VCEK"
            },
            report.vmpl()
        ),
    );

    // Policy checks need only the report; run them regardless of the chain outcome so the
    // user sees every problem at once. TCB-dependent ones need the product (below).
    let cpuid_product = report.cpuid_product();

    // 2. VEK certificate.
    let resolved = match vek::resolve(&req.vek, &report, cpuid_product) {
        Ok(r) => r,
        Err(e) => {
            ctx.fail("vek.source", e.to_string());
            policy_checks(req, &report, None, ctx);
            return;
        }
    };
    out.vek_origin = Some(resolved.origin.clone());
    let vek_what = format!("VEK from {}", resolved.origin);
    let vek_cert = match certs::parse_cert(&resolved.vek, &vek_what) {
        Ok(c) => c,
        Err(e) => {
            ctx.fail("vek.source", e.to_string());
            policy_checks(req, &report, None, ctx);
            return;
        }
    };
    let kind = certs::kind_of(&vek_cert);
    let want = if key == SigningKey::Vlek {
        VekKind::Vlek
    } else {
        VekKind::Vcek
    };
    if kind != want {
        ctx.fail(
            "vek.source",
            format!(
                "the report is signed by a {want} but {} is a {kind} ({})",
                resolved.origin,
                certs::common_name(&vek_cert)
            ),
        );
        policy_checks(req, &report, None, ctx);
        return;
    }
    ctx.pass("vek.source", format!("{kind} from {}", resolved.origin));

    // Supplied intermediates: from the request, else from the certificate table.
    let mut supplied_inter: Option<Certificate> = None;
    for (bytes, what) in [
        (req.intermediate.as_ref(), "supplied ASK/ASVK"),
        (
            resolved.intermediate.as_ref(),
            "ASK/ASVK from the certificate table",
        ),
    ] {
        if supplied_inter.is_some() {
            break;
        }
        if let Some(b) = bytes {
            match certs::parse_cert(b, what) {
                Ok(c) => supplied_inter = Some(c),
                Err(e) => {
                    ctx.fail("chain.intermediate", e.to_string());
                    return;
                }
            }
        }
    }

    // 3. Product.
    let product = match pick_product(&report, &vek_cert, kind, supplied_inter.as_ref()) {
        Ok((p, how)) => {
            ctx.pass("product", format!("{p} ({how})"));
            p
        }
        Err(e) => {
            ctx.fail("product", e);
            policy_checks(req, &report, None, ctx);
            return;
        }
    };
    out.product = Some(product);
    out.reported_tcb = Some(report.reported_tcb(product));

    // 4. Chain: pinned ARK -> ASK/ASVK -> VEK.
    chain_checks(
        ctx,
        product,
        kind,
        &vek_cert,
        supplied_inter.as_ref(),
        resolved.ark.as_deref(),
        req.at,
    );

    // 5. Report signature over the raw bytes.
    ctx.result("report.signature", verify_signature(&report, &vek_cert));

    // 6. VEK extensions against the report.
    match certs::vek_extensions(&vek_cert, product.is_turin_like()) {
        Err(e) => ctx.fail("vek.tcb", e),
        Ok(ext) => {
            let reported = report.reported_tcb(product);
            ctx.result("vek.tcb", tcb_matches(&ext.tcb, &reported));
            if let Some(name) = &ext.product_name {
                let base = name.split('-').next().unwrap_or(name);
                // Genoa-family parts (e.g. Siena) are certified under Genoa.
                let same = base.eq_ignore_ascii_case(product.name())
                    || (product == Product::Genoa && base.eq_ignore_ascii_case("Siena"));
                if same {
                    ctx.pass("vek.product", format!("certificate productName {name}"));
                } else {
                    ctx.fail(
                        "vek.product",
                        format!("certificate productName {name} but the report is from {product}"),
                    );
                }
            }
            match kind {
                VekKind::Vlek => ctx.skip(
                    "vek.hwid",
                    format!(
                        "VLEKs are not chip-bound (cspId {})",
                        ext.csp_id.as_deref().unwrap_or("absent")
                    ),
                ),
                VekKind::Vcek => {
                    ctx.result("vek.hwid", hwid_matches(&ext, &report, product));
                }
            }
        }
    }

    policy_checks(req, &report, Some(product), ctx);
}

fn pick_product(
    report: &SnpReport,
    vek: &Certificate,
    kind: VekKind,
    supplied: Option<&Certificate>,
) -> Result<(Product, String), String> {
    if report.version() >= 3 {
        let (fam, model) = report.cpuid_family_model().unwrap_or((0, 0));
        return report
            .cpuid_product()
            .map(|p| (p, format!("CPUID family {fam:#04x} model {model:#04x}")))
            .ok_or_else(|| {
                format!("CPUID family {fam:#04x} model {model:#04x} is not Milan, Genoa or Turin")
            });
    }
    // v2: no CPUID fields; the product whose signing key signed the VEK wins.
    for p in ALL_PRODUCTS {
        let inter = match kind {
            VekKind::Vcek => p.ask().ok(),
            VekKind::Vlek => match p.asvk() {
                Some(r) => r.ok(),
                None => supplied.cloned(),
            },
        };
        if let Some(i) = inter {
            let ark_signed = p
                .ark()
                .ok()
                .is_some_and(|ark| certs::signed_by(&i, &ark).is_ok());
            if ark_signed && certs::signed_by(vek, &i).is_ok() {
                return Ok((p, "v2 report: from the certificate chain".into()));
            }
        }
    }
    Err("v2 report without CPUID fields and no pinned product key signed the VEK".into())
}

fn chain_checks(
    ctx: &mut Ctx,
    product: Product,
    kind: VekKind,
    vek: &Certificate,
    supplied: Option<&Certificate>,
    evidence_ark: Option<&[u8]>,
    at: SystemTime,
) -> bool {
    let ark = match product.ark() {
        Ok(a) => a,
        Err(e) => {
            ctx.fail("chain.ark", e);
            return false;
        }
    };
    let mut ok = true;
    // The ARK in the evidence (if any) must be the pinned one.
    let mut ark_detail = format!(
        "pinned {product} ARK, SHA-256 {}",
        product.pinned_ark_sha256()
    );
    if let Some(b) = evidence_ark {
        match certs::parse_cert(b, "ARK from the certificate table")
            .map_err(|e| e.to_string())
            .and_then(|c| fingerprint(&c))
        {
            Ok(fp) if fp == product.pinned_ark_sha256() => {
                ark_detail.push_str("; the evidence's ARK matches the pin")
            }
            Ok(fp) => {
                ctx.fail(
                    "chain.ark",
                    format!(
                        "the evidence's ARK has SHA-256 {fp}, not the pinned {}",
                        product.pinned_ark_sha256()
                    ),
                );
                return false;
            }
            Err(e) => {
                ctx.fail("chain.ark", e);
                return false;
            }
        }
    }
    match certs::signed_by(&ark, &ark) {
        Ok(()) => ctx.pass("chain.ark", format!("{ark_detail}, self-signed")),
        Err(e) => {
            ctx.fail("chain.ark", format!("ARK is not self-signed: {e}"));
            ok = false;
        }
    }

    let (label, inter, origin) = match kind {
        VekKind::Vcek => match product.ask() {
            Ok(a) => ("ASK", Some(a), "pinned"),
            Err(e) => {
                ctx.fail("chain.ask", e);
                return false;
            }
        },
        VekKind::Vlek => match product.asvk() {
            Some(Ok(a)) => ("ASVK", Some(a), "pinned"),
            Some(Err(e)) => {
                ctx.fail("chain.ask", e);
                return false;
            }
            None => ("ASVK", supplied.cloned(), "supplied"),
        },
    };
    let Some(inter) = inter else {
        ctx.fail(
            "chain.ask",
            format!(
                "no {product} ASVK is pinned in this build and none was supplied; get it from {} and pass it as the intermediate",
                vek::kds_chain_url(product, true)
            ),
        );
        // Still show the validity of the VEK itself.
        validity(ctx, &[("VEK", vek)], at);
        return false;
    };
    match certs::signed_by(&inter, &ark) {
        Ok(()) => ctx.pass(
            "chain.ask",
            format!(
                "{origin} {label} ({}) signed by the ARK",
                certs::common_name(&inter)
            ),
        ),
        Err(e) => {
            ctx.fail(
                "chain.ask",
                format!("{origin} {label} is not signed by the pinned {product} ARK: {e}"),
            );
            ok = false;
        }
    }
    match certs::signed_by(vek, &inter) {
        Ok(()) => ctx.pass("chain.vek", format!("{kind} signed by the {label}")),
        Err(e) => {
            ctx.fail(
                "chain.vek",
                format!("{kind} is not signed by the {product} {label}: {e}"),
            );
            ok = false;
        }
    }
    ok &= validity(ctx, &[("ARK", &ark), (label, &inter), ("VEK", vek)], at);
    ok
}

fn validity(ctx: &mut Ctx, certs_: &[(&str, &Certificate)], at: SystemTime) -> bool {
    let mut problems = Vec::new();
    for (name, c) in certs_ {
        if let Err(e) = certs::check_validity(c, at) {
            problems.push(format!("{name} {e}"));
        }
    }
    if problems.is_empty() {
        let vek_end = certs_
            .iter()
            .find(|(n, _)| *n == "VEK")
            .map(|(_, c)| humantime::format_rfc3339_seconds(certs::not_after(c)).to_string())
            .unwrap_or_default();
        ctx.pass(
            "cert.validity",
            format!(
                "all valid at {} (VEK notAfter {vek_end})",
                humantime::format_rfc3339_seconds(at)
            ),
        );
        true
    } else {
        ctx.fail("cert.validity", problems.join("; "));
        false
    }
}

fn verify_signature(report: &SnpReport, vek: &Certificate) -> Result<String, String> {
    use p384::ecdsa::signature::Verifier;
    let spki = vek
        .tbs_certificate
        .subject_public_key_info
        .subject_public_key
        .raw_bytes();
    let key = p384::ecdsa::VerifyingKey::from_sec1_bytes(spki)
        .map_err(|e| format!("VEK public key is not a P-384 point: {e}"))?;
    let (r, s) = report.signature_rs().map_err(|e| e.to_string())?;
    let sig = p384::ecdsa::Signature::from_scalars(r, s)
        .map_err(|e| format!("signature scalars out of range: {e}"))?;
    key.verify(report.signed_bytes(), &sig).map_err(|_| {
        "ECDSA P-384 signature over report bytes 0x000..0x2A0 does not verify with the VEK"
            .to_string()
    })?;
    Ok("ECDSA P-384/SHA-384 over the raw bytes 0x000..0x2A0 verifies with the VEK".into())
}

/// The VEK's SPLs must equal the report's REPORTED_TCB (the TCB the key was derived for).
pub(crate) fn tcb_matches(cert: &Tcb, reported: &Tcb) -> Result<String, String> {
    if cert == reported {
        Ok(format!("certificate SPLs = reported_tcb ({reported})"))
    } else {
        Err(format!(
            "certificate SPLs ({cert}) differ from reported_tcb ({reported})"
        ))
    }
}

fn hwid_matches(
    ext: &certs::VekExtensions,
    report: &SnpReport,
    product: Product,
) -> Result<String, String> {
    let Some(hw) = &ext.hw_id else {
        return Err("VCEK has no hwID extension".into());
    };
    if report.chip_id_masked() {
        return Err("CHIP_ID is masked in the report; a VCEK cannot be matched to it".into());
    }
    let chip = report.chip_id();
    let expect: &[u8] = if product.is_turin_like() {
        &chip[..8]
    } else {
        chip
    };
    if hw.as_slice() == expect {
        Ok(format!("hwID = chip_id ({}...)", hex::encode(&expect[..8])))
    } else {
        Err(format!(
            "hwID {} differs from chip_id {}",
            hex::encode(hw),
            hex::encode(expect)
        ))
    }
}

fn policy_checks(
    req: &VerifyRequest<'_>,
    report: &SnpReport,
    product: Option<Product>,
    ctx: &mut Ctx,
) {
    let p = req.policy;
    match (report.debug_allowed(), p.allow_debug) {
        (false, _) => ctx.pass("policy.debug", "guest policy DEBUG = 0"),
        (true, true) => ctx.pass("policy.debug", "guest policy DEBUG = 1, allowed by policy"),
        (true, false) => ctx.fail(
            "policy.debug",
            "guest policy DEBUG = 1 (debugging allowed); policy requires 0",
        ),
    }
    match (report.migrate_ma_allowed(), p.allow_migration_agent) {
        (false, _) => ctx.pass("policy.migration", "guest policy MIGRATE_MA = 0"),
        (true, true) => ctx.pass(
            "policy.migration",
            "guest policy MIGRATE_MA = 1, allowed by policy",
        ),
        (true, false) => ctx.fail(
            "policy.migration",
            "guest policy MIGRATE_MA = 1; policy requires 0",
        ),
    }
    if p.allowed_vmpls.contains(&report.vmpl()) {
        ctx.pass(
            "policy.vmpl",
            format!("VMPL {} in {:?}", report.vmpl(), p.allowed_vmpls),
        );
    } else {
        ctx.fail(
            "policy.vmpl",
            format!(
                "VMPL {} not in allowed {:?}",
                report.vmpl(),
                p.allowed_vmpls
            ),
        );
    }
    match (&p.min_tcb, product) {
        (None, _) => ctx.skip("policy.min_tcb", "policy sets no minimum TCB"),
        (Some(_), None) => ctx.fail("policy.min_tcb", "product unknown, TCB cannot be decoded"),
        (Some(min), Some(prod)) => {
            let t = report.reported_tcb(prod);
            if t.at_least(min) {
                ctx.pass("policy.min_tcb", format!("reported_tcb {t} >= {min}"));
            } else {
                ctx.fail(
                    "policy.min_tcb",
                    format!("reported_tcb {t} below minimum {min}"),
                );
            }
        }
    }
    let m = report.measurement();
    if p.measurements.is_empty() {
        ctx.skip(
            "policy.measurement",
            format!(
                "policy lists no expected measurement (report has {})",
                hex::encode(m)
            ),
        );
    } else if p.measurements.iter().any(|e| e.as_slice() == m) {
        ctx.pass(
            "policy.measurement",
            format!("measurement {} is expected", hex::encode(m)),
        );
    } else {
        ctx.fail(
            "policy.measurement",
            format!(
                "measurement {} is not among the {} expected",
                hex::encode(m),
                p.measurements.len()
            ),
        );
    }
    match &p.host_data {
        None => ctx.skip("policy.host_data", "policy sets no host_data"),
        Some(h) if h.as_slice() == report.host_data() => {
            ctx.pass("policy.host_data", "host_data matches")
        }
        Some(h) => ctx.fail(
            "policy.host_data",
            format!(
                "host_data {} differs from expected {}",
                hex::encode(report.host_data()),
                hex::encode(h)
            ),
        ),
    }
    match req.freshness {
        None => ctx.skip(
            "freshness",
            "no nonce given; the report is not bound to this request",
        ),
        Some(f) => {
            let got = report.report_data();
            let hit = p
                .report_data_hashes
                .iter()
                .find(|h| h.report_data(&f.nonce, f.public_key.as_deref()).as_slice() == got);
            let what = if f.public_key.is_some() {
                "nonce and public key"
            } else {
                "nonce"
            };
            match hit {
                Some(h) => ctx.pass(
                    "freshness",
                    format!("report_data = {h:?}({what}), zero-padded"),
                ),
                None => ctx.fail(
                    "freshness",
                    format!(
                        "report_data {} is not {:?} of the {what}",
                        hex::encode(&got[..16]) + "...",
                        p.report_data_hashes
                    ),
                ),
            }
        }
    }
}

/// Verifies only the report signature (raw bytes 0..0x2A0) with the given VEK (DER or PEM).
pub fn verify_report_signature(report: &SnpReport, vek: &[u8]) -> crate::Result<()> {
    let cert = certs::parse_cert(vek, "VEK")?;
    verify_signature(report, &cert)
        .map(|_| ())
        .map_err(crate::Error::Report)
}
