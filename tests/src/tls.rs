//! Certificates for the suites that test TLS: [`TestCa`] makes a private CA and issues server and
//! client certificates from it with the `openssl` command (EC P-256, PEM files in a temporary
//! directory), and [`postgres_ca`] finds the CA of the local PostgreSQL's certificate, which
//! `scripts/test.sh` makes when it turns `ssl` on.
//!
//! Not here: the servers that use the certificates (see [`crate::nats`], [`crate::process`]).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

/// Where `scripts/test.sh` leaves the CA of the local PostgreSQL's test certificate.
pub const POSTGRES_CA_DEFAULT: &str = "/var/lib/postgresql/e2e-tls/ca.crt";

/// The CA the PostgreSQL of the suites chains to (`E2E_POSTGRES_CA`, or what `scripts/test.sh`
/// made); an error that says how to get one when it is missing.
pub fn postgres_ca() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("E2E_POSTGRES_CA").map_or_else(|| PathBuf::from(POSTGRES_CA_DEFAULT), PathBuf::from);
    if !path.is_file() {
        bail!(
            "no PostgreSQL test CA at {}: run scripts/test.sh, which turns on TLS on the local PostgreSQL \
             (or set E2E_POSTGRES_CA to the CA of E2E_POSTGRES_URL's server)",
            path.display()
        );
    }
    Ok(path)
}

/// A certificate and its key, PEM files.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A private CA in a temporary directory.
#[derive(Debug)]
pub struct TestCa {
    dir: tempfile::TempDir,
    name: String,
}

impl TestCa {
    /// A new CA named `name` (its certificate at [`TestCa::cert`]).
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("e2e-ca-").tempdir()?;
        let ca = Self { dir, name: name.to_owned() };
        openssl(
            ca.dir.path(),
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "30",
                "-subj",
                &format!("/CN={name}"),
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        )?;
        Ok(ca)
    }

    /// The CA's certificate (what clients trust).
    pub fn cert(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A server certificate for 127.0.0.1, ::1 and localhost.
    pub fn server(&self, label: &str) -> anyhow::Result<Issued> {
        self.issue(label, "subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost", "serverAuth")
    }

    /// A client certificate (for servers that verify their clients).
    pub fn client(&self, label: &str) -> anyhow::Result<Issued> {
        self.issue(label, &format!("subjectAltName=DNS:{label}.clients.e2e"), "clientAuth")
    }

    fn issue(&self, label: &str, san: &str, usage: &str) -> anyhow::Result<Issued> {
        let dir = self.dir.path();
        let (key, csr, cert, ext) =
            (format!("{label}.key"), format!("{label}.csr"), format!("{label}.crt"), format!("{label}.ext"));
        std::fs::write(
            dir.join(&ext),
            format!("{san}\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage={usage}\n"),
        )?;
        openssl(
            dir,
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-subj",
                &format!("/CN={label} of {}", self.name),
                "-keyout",
                &key,
                "-out",
                &csr,
            ],
        )?;
        let serial = format!("0x{:016x}", rand::random::<u64>() >> 1);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-days",
                "30",
                "-set_serial",
                &serial,
                "-extfile",
                &ext,
                "-out",
                &cert,
            ],
        )?;
        Ok(Issued { cert: dir.join(cert), key: dir.join(key) })
    }
}

fn openssl(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .context("running openssl (scripts/test.sh installs it)")?;
    if !output.status.success() {
        bail!("openssl {} failed: {}", args.join(" "), String::from_utf8_lossy(&output.stderr));
    }
    Ok(())
}
