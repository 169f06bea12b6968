//! TLS and mutual TLS between the actor's clients and a real verifier on a loopback port,
//! with certificates made for the test: only a client that trusts the server's CA, presents
//! a certificate the server's client CA signed and carries the token gets an answer.
use std::path::{Path, PathBuf};
use std::time::Duration;

use prime_proto::auth::{ClientTls, ServerAuth, ServerTls};
use prime_proto::client::{lazy_channel_secure, request, verifier_client, with_deadline};
use prime_proto::v1 as pb;
use prime_verifier::grade::{Grader, GraderConfig};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

/// A certificate authority and the PEM files of leaves it signs.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// Writes `<stem>.pem` and `<stem>.key` for a leaf valid for `names`.
    fn leaf(&self, dir: &Path, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (cert_path, key_path) = (
            dir.join(format!("{stem}.pem")),
            dir.join(format!("{stem}.key")),
        );
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }

    fn write(&self, dir: &Path, stem: &str) -> PathBuf {
        let path = dir.join(format!("{stem}-ca.pem"));
        std::fs::write(&path, &self.pem).unwrap();
        path
    }
}

fn grade(
    runtime: &tokio::runtime::Runtime,
    url: &str,
    token: Option<&str>,
    tls: &ClientTls,
) -> Result<Vec<pb::GradeResult>, String> {
    runtime.block_on(async {
        let channel = lazy_channel_secure("verifier", url, Duration::from_secs(5), token, tls)
            .map_err(|e| e.to_string())?;
        let mut client = verifier_client(channel);
        let deadline = Duration::from_secs(20);
        let items = vec![pb::GradeItem {
            id: "a".into(),
            ability: pb::GradeAbility::Math as i32,
            response: "The answer is \\boxed{4}".into(),
            ground_truth: "4".into(),
            ..Default::default()
        }];
        with_deadline("Verifier", "Grade", deadline, async move {
            let call = client.grade(request(pb::GradeRequest { items }, deadline));
            call.await.map(|r| r.into_inner().results)
        })
        .await
        .map_err(|e| e.to_string())
    })
}

#[test]
fn mutual_tls_lets_in_only_clients_with_a_signed_certificate_and_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("prime test server CA");
    let client_ca = Ca::new("prime test client CA");
    let stranger_ca = Ca::new("someone else");
    let (server_cert, server_key) = server_ca.leaf(dir.path(), "server", &["localhost"]);
    let (client_cert, client_key) = client_ca.leaf(dir.path(), "client", &["actor-0"]);
    let (stranger_cert, stranger_key) = stranger_ca.leaf(dir.path(), "stranger", &["actor-x"]);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server_auth = ServerAuth {
        token: Some("s3cret-s3cret-s3cret".into()),
        allow_no_token: false,
        tls: ServerTls {
            cert: Some(server_cert),
            key: Some(server_key),
            client_ca: Some(client_ca.write(dir.path(), "client")),
        },
    };
    let port = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let grader = Grader::new(GraderConfig::default());
        tokio::spawn(async move {
            prime_verifier::service::serve_secure(
                listener,
                grader,
                &server_auth,
                std::future::pending(),
            )
            .await
            .unwrap();
        });
        port
    });
    let https = format!("https://localhost:{port}");
    let trusted = ClientTls {
        ca: Some(server_ca.write(dir.path(), "server")),
        cert: Some(client_cert.clone()),
        key: Some(client_key.clone()),
        domain: None,
    };

    let results = grade(&runtime, &https, Some("s3cret-s3cret-s3cret"), &trusted).unwrap();
    assert_eq!(results[0].score, 1.0);

    // The token is still checked over TLS.
    let err = grade(&runtime, &https, Some("wrong-wrong-wrong-wrong"), &trusted).unwrap_err();
    assert!(err.contains("token"), "{err}");
    // No client certificate, or one from another CA: the handshake fails.
    let anonymous = ClientTls {
        cert: None,
        key: None,
        ..trusted.clone()
    };
    assert!(grade(&runtime, &https, Some("s3cret-s3cret-s3cret"), &anonymous).is_err());
    let stranger = ClientTls {
        cert: Some(stranger_cert),
        key: Some(stranger_key),
        ..trusted.clone()
    };
    assert!(grade(&runtime, &https, Some("s3cret-s3cret-s3cret"), &stranger).is_err());
    // A client that does not trust the server's CA refuses the server.
    let gullible = ClientTls {
        ca: Some(stranger_ca.write(dir.path(), "stranger")),
        ..trusted.clone()
    };
    assert!(grade(&runtime, &https, Some("s3cret-s3cret-s3cret"), &gullible).is_err());
    // Plain HTTP/2 to a TLS port gets nothing, and TLS files with an http:// URL are refused
    // before any connection (no silent downgrade).
    let plain = format!("http://localhost:{port}");
    assert!(grade(
        &runtime,
        &plain,
        Some("s3cret-s3cret-s3cret"),
        &ClientTls::default()
    )
    .is_err());
    let err = grade(&runtime, &plain, Some("s3cret-s3cret-s3cret"), &trusted).unwrap_err();
    assert!(err.contains("plain http://"), "{err}");
}
