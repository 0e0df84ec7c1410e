//! AMD products (CPU generations) and their pinned root certificates.
//!
//! The ARK/ASK PEMs are AMD's published KDS certificates (the same ones the `sev` crate ships);
//! the ASVK PEMs sign VLEKs. Each ARK is additionally pinned by the SHA-256 of its DER so that
//! a swapped file in this directory cannot silently change the trust root.

use serde::Serialize;
use sha2::{Digest, Sha256};
use std::fmt;
use x509_cert::der::{DecodePem, Encode};

/// An SEV-SNP capable EPYC generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Product {
    /// 3rd generation EPYC (family 19h, models 00h-0Fh).
    Milan,
    /// 4th generation EPYC (family 19h, models 10h-1Fh, A0h-AFh).
    Genoa,
    /// 5th generation EPYC (family 1Ah, models 00h-1Fh).
    Turin,
}

/// Every product, in the order a v2 report's chain is tried.
pub const ALL_PRODUCTS: [Product; 3] = [Product::Milan, Product::Genoa, Product::Turin];

impl fmt::Display for Product {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Product {
    /// KDS spelling ("Milan", "Genoa", "Turin").
    pub fn name(self) -> &'static str {
        match self {
            Product::Milan => "Milan",
            Product::Genoa => "Genoa",
            Product::Turin => "Turin",
        }
    }

    /// Parses the KDS spelling, case-insensitively.
    pub fn from_name(s: &str) -> Option<Product> {
        ALL_PRODUCTS
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(s))
    }

    /// Product from the CPUID family/model the report carries (v3+), via the `sev` crate.
    pub fn from_cpuid(family: u8, model: u8) -> Option<Product> {
        match sev::Generation::identify_cpu(family, model).ok()? {
            sev::Generation::Milan => Some(Product::Milan),
            sev::Generation::Genoa => Some(Product::Genoa),
            sev::Generation::Turin => Some(Product::Turin),
            _ => None,
        }
    }

    /// Turin changed the TCB layout (adds FMC) and shortened hwID to 8 bytes.
    pub fn is_turin_like(self) -> bool {
        matches!(self, Product::Turin)
    }

    /// SHA-256 of the DER of AMD's root key certificate for this product.
    pub fn pinned_ark_sha256(self) -> &'static str {
        match self {
            Product::Milan => "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd",
            Product::Genoa => "4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1",
            Product::Turin => "1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a",
        }
    }

    pub(crate) fn ark_pem(self) -> &'static [u8] {
        match self {
            Product::Milan => include_bytes!("../certs/milan/ark.pem"),
            Product::Genoa => include_bytes!("../certs/genoa/ark.pem"),
            Product::Turin => include_bytes!("../certs/turin/ark.pem"),
        }
    }

    pub(crate) fn ask_pem(self) -> &'static [u8] {
        match self {
            Product::Milan => include_bytes!("../certs/milan/ask.pem"),
            Product::Genoa => include_bytes!("../certs/genoa/ask.pem"),
            Product::Turin => include_bytes!("../certs/turin/ask.pem"),
        }
    }

    /// The ASVK (VLEK signing key). Not pinned for Milan: it was not obtainable offline when
    /// this crate was written; Milan VLEK chains need the ASVK from the evidence (certificate
    /// table) or a file, and it is accepted only if the pinned ARK signed it.
    pub(crate) fn asvk_pem(self) -> Option<&'static [u8]> {
        match self {
            Product::Milan => None,
            Product::Genoa => Some(include_bytes!("../certs/genoa/asvk.pem")),
            Product::Turin => Some(include_bytes!("../certs/turin/asvk.pem")),
        }
    }

    /// The pinned ARK, after checking its fingerprint.
    pub(crate) fn ark(self) -> Result<x509_cert::Certificate, String> {
        let cert = x509_cert::Certificate::from_pem(self.ark_pem())
            .map_err(|e| format!("embedded {self} ARK does not parse: {e}"))?;
        let fp = fingerprint(&cert)?;
        if fp != self.pinned_ark_sha256() {
            return Err(format!(
                "embedded {self} ARK fingerprint {fp} differs from pinned {}",
                self.pinned_ark_sha256()
            ));
        }
        Ok(cert)
    }

    pub(crate) fn ask(self) -> Result<x509_cert::Certificate, String> {
        x509_cert::Certificate::from_pem(self.ask_pem())
            .map_err(|e| format!("embedded {self} ASK does not parse: {e}"))
    }

    pub(crate) fn asvk(self) -> Option<Result<x509_cert::Certificate, String>> {
        self.asvk_pem().map(|pem| {
            x509_cert::Certificate::from_pem(pem)
                .map_err(|e| format!("embedded {self} ASVK does not parse: {e}"))
        })
    }
}

/// Lower-case hex SHA-256 of a certificate's DER encoding.
pub(crate) fn fingerprint(cert: &x509_cert::Certificate) -> Result<String, String> {
    let der = cert
        .to_der()
        .map_err(|e| format!("cannot re-encode certificate: {e}"))?;
    Ok(hex::encode(Sha256::digest(&der)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::signed_by;

    #[test]
    fn embedded_roots_are_pinned_and_chain() {
        for p in ALL_PRODUCTS {
            let ark = p.ark().unwrap(); // checks the fingerprint pin
            signed_by(&ark, &ark).unwrap();
            signed_by(&p.ask().unwrap(), &ark).unwrap();
            if let Some(asvk) = p.asvk() {
                let asvk = asvk.unwrap();
                signed_by(&asvk, &ark).unwrap();
                assert!(asvk
                    .tbs_certificate
                    .subject
                    .to_string()
                    .contains("SEV-VLEK"));
            }
        }
        // A product's intermediates do not chain to another product's root.
        let milan = Product::Milan.ark().unwrap();
        assert!(signed_by(&Product::Genoa.ask().unwrap(), &milan).is_err());
    }

    #[test]
    fn product_from_cpuid() {
        assert_eq!(Product::from_cpuid(0x19, 0x01), Some(Product::Milan));
        assert_eq!(Product::from_cpuid(0x19, 0x11), Some(Product::Genoa));
        assert_eq!(Product::from_cpuid(0x1A, 0x02), Some(Product::Turin));
        assert_eq!(Product::from_cpuid(0x17, 0x31), None);
        assert_eq!(Product::from_name("genoa"), Some(Product::Genoa));
    }
}
