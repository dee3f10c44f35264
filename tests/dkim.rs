//! End to end: a notification sent as claire@customer.com leaves from the
//! authorized sender, DKIM-signed, and an independent verifier (dkimpy)
//! accepts the signature with the record `herald dkim-keygen` printed.

mod common;

use common::*;

const BODY: &str = "Bonjour Louise,\n\nLe fichier « rapport.pdf » est prêt.\n.une ligne qui commence par un point\n..et deux\n\n-- \nPlateforme\n";

#[test]
fn signed_with_rsa_and_ed25519_and_verified_by_dkimpy() {
    let sink = Sink::start(Script::default());
    let (h, keys) = signing_herald(&sink);
    let [rsa, ed]: [(String, String); 2] = keys.try_into().unwrap();
    let mut c = h.client();
    c.ehlo();
    let msg = format!(
        "From: Claire Martin <claire@customer.com>\nTo: louise@dest.test\nSubject: =?UTF-8?Q?Nouveau_fichier_d=C3=A9pos=C3=A9?=\nMIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n{BODY}"
    );
    assert_eq!(
        c.send("app@platform.test", &["louise@dest.test"], &msg).0,
        250
    );
    let msg2 = msg.replace("claire@customer.com", "bob@edcustomer.test");
    assert_eq!(
        c.send("app@platform.test", &["louise@dest.test"], &msg2).0,
        250
    );
    let msgs = sink.wait_for(2, 10);
    assert_eq!(msgs.len(), 2, "{}", h.log());

    let m1 = msgs
        .iter()
        .find(|m| m.text().contains("claire@customer.com"))
        .unwrap();
    let t1 = m1.text();
    assert!(t1.starts_with("DKIM-Signature: "), "{t1}");
    assert!(
        t1.contains("\r\nFrom: \"Claire Martin\" <notifications@example.com>\r\n"),
        "{t1}"
    );
    assert!(
        t1.contains("\r\nReply-To: \"Claire Martin\" <claire@customer.com>\r\n"),
        "{t1}"
    );
    assert!(t1.contains("d=example.com"), "{t1}");
    assert!(
        t1.ends_with(&BODY.replace('\n', "\r\n")),
        "body intact: {t1}"
    );
    let v = dkimpy(&m1.data, std::slice::from_ref(&rsa))
        .unwrap_or_else(|e| panic!("dkimpy: {e}\n{t1}"));
    assert!(
        v.contains("pass d=example.com s=herald a=rsa-sha256"),
        "{v}"
    );

    let m2 = msgs
        .iter()
        .find(|m| m.text().contains("bob@edcustomer.test"))
        .unwrap();
    let t2 = m2.text();
    assert!(
        t2.contains("\r\nFrom: \"Claire Martin\" <notify@ed.example>\r\n"),
        "{t2}"
    );
    let v =
        dkimpy(&m2.data, std::slice::from_ref(&ed)).unwrap_or_else(|e| panic!("dkimpy: {e}\n{t2}"));
    assert!(
        v.contains("pass d=ed.example s=ed1 a=ed25519-sha256"),
        "{v}"
    );

    // The verifier is not a rubber stamp: a changed body or the wrong key fails.
    let mut tampered = m1.data.clone();
    let n = tampered.len();
    tampered[n - 5] = b'X';
    assert!(dkimpy(&tampered, &[rsa]).is_err());
    assert!(dkimpy(
        &m1.data,
        &[(
            ed.0.replace("ed1._domainkey.ed.example", "herald._domainkey.example.com"),
            ed.1
        )]
    )
    .is_err());
}

#[test]
fn a_key_that_does_not_load_stops_startup_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.pem"),
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let err = serve_fails(
        dir.path(),
        &format!("{BASE}[[dkim]]\ndomain = \"example.com\"\nselector = \"s\"\nprivate_key = \"bad.pem\"\n[listen]\nsmtp = [\"127.0.0.1:{}\"]\n", free_port()),
    );
    assert!(err.contains("bad.pem"), "{err}");
}

#[test]
fn warns_at_startup_when_the_default_sender_cannot_be_signed() {
    let h = Herald::start("");
    assert!(
        wait_until(5, || h.log().contains("no [[dkim]] key for example.com")),
        "{}",
        h.log()
    );
}

/// The README's swaks example and the like: with and without MIME headers,
/// in many header orders, signed with RSA and Ed25519, every signature
/// verifies with dkimpy (it refuses a `b=` value folded onto a lone `;`).
#[test]
fn every_signature_verifies_with_dkimpy_whatever_the_headers() {
    let sink = Sink::start(Script::default());
    let (h, keys) = signing_herald(&sink);
    let [rsa, ed]: [(String, String); 2] = keys.try_into().unwrap();
    // What swaks sends, then optional fields, MIME ones among them.
    let swaks = [
        "Date: Tue, 24 Nov 2026 02:34:13 +0000",
        "To: louise@dest.test",
        "Subject: test Tue, 24 Nov 2026 02:34:13 +0000",
        "Message-Id: <20261124023413.001@vm>",
        "X-Mailer: swaks v20240103.0 jetmore.org/john/code/swaks/",
    ];
    let optional = [
        "Cc: marc@dest.test",
        "Reply-To: support@customer.com",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "To: second@dest.test",
    ];
    let mut msgs = Vec::new();
    for variant in 0..32usize {
        let mut fields: Vec<&str> = swaks.to_vec();
        for (bit, f) in optional.iter().enumerate() {
            if variant & (1 << bit) != 0 {
                fields.push(f);
            }
        }
        // A different order each time, From anywhere in it.
        let n = fields.len();
        fields.rotate_left(variant % n);
        for from in ["claire@customer.com", "bob@edcustomer.test"] {
            let mut f = fields.clone();
            let from = format!("From: {from}");
            f.insert(variant * 7 % (n + 1), &from);
            msgs.push(format!("{}\n\nThis is a test mailing\n", f.join("\n")));
        }
    }
    let mut c = h.client();
    c.ehlo();
    for m in &msgs {
        assert_eq!(c.send("app@platform.test", &["louise@dest.test"], m).0, 250);
    }
    let got = sink.wait_for(msgs.len(), 20);
    assert_eq!(got.len(), msgs.len(), "{}", h.log());
    let data: Vec<Vec<u8>> = got.iter().map(|m| m.data.clone()).collect();
    let verdicts = dkimpy_all(&data, &[rsa, ed]);
    let failed: Vec<String> = verdicts
        .iter()
        .zip(&got)
        .filter(|(v, _)| v.is_err())
        .map(|(_, m)| m.text())
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} fail dkimpy; first:\n{}",
        failed.len(),
        got.len(),
        failed.first().map(String::as_str).unwrap_or("")
    );
    let algs: Vec<&str> = verdicts
        .iter()
        .map(|v| v.as_ref().unwrap().rsplit("a=").next().unwrap())
        .collect();
    assert!(algs.contains(&"rsa-sha256") && algs.contains(&"ed25519-sha256"));
    for m in &got {
        let t = m.text();
        let sig = t
            .split("\r\n")
            .take_while(|l| !l.starts_with("Received"))
            .collect::<Vec<_>>()
            .join("\r\n");
        assert!(
            !sig.contains("\r\n\t;") && !sig.trim_end().ends_with(';'),
            "{sig}"
        );
    }
}
