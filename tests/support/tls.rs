//! Throwaway TLS material for the private servers the tests start (Dovecot, PostgreSQL).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// What [`write_test_certificates`] wrote.
pub struct TestCertificates {
    /// The CA a client is told to trust.
    pub ca: PathBuf,
    /// The server's certificate (for `localhost` and `127.0.0.1`), issued by the CA.
    pub cert: PathBuf,
    /// The server's private key (mode 0600).
    pub key: PathBuf,
}

/// Writes a throwaway CA, and a server certificate and key it issued, to `dir/tls/`. The CA and
/// the certificate are readable by all (mode 0644), the key by its owner alone.
pub fn write_test_certificates(dir: &Path) -> TestCertificates {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let dir = dir.join("tls");
    fs::create_dir(&dir).expect("create tls dir");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "mailhook test CA");
    ca_params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key")).expect("CA certificate");
    let mut params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).expect("server params");
    params.distinguished_name.push(DnType::CommonName, "localhost");
    let key = KeyPair::generate().expect("server key");
    let cert = params.signed_by(&key, &ca).expect("server certificate");
    let files = TestCertificates { ca: dir.join("ca.pem"), cert: dir.join("server.pem"), key: dir.join("server.key") };
    for (path, contents, mode) in
        [(&files.ca, ca.pem(), 0o644), (&files.cert, cert.pem(), 0o644), (&files.key, key.serialize_pem(), 0o600)]
    {
        fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod tls file");
    }
    files
}
