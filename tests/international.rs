//! International mail end to end (RFC 6531): herald offers SMTPUTF8,
//! carries SMTPUTF8 and BODY=8BITMIME to an upstream that offers them, and
//! a UTF-8 address meant for an upstream without SMTPUTF8 bounces with
//! class `policy` and a reason that says so.

mod common;

use common::*;

/// Sends one UTF-8 message with Python's smtplib, `SMTPUTF8` and
/// `BODY=8BITMIME`, to a UTF-8 and an ASCII recipient.
fn send_with_smtplib(h: &Herald) {
    let script = format!(
        r#"
import smtplib
msg = "From: Zoë <zoe@platform.test>\r\nTo: José <josé@exemple.test>\r\nSubject: Fichier déposé\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nVotre fichier est prêt.\r\n"
with smtplib.SMTP("127.0.0.1", {port}) as s:
    s.ehlo("py.test")
    assert s.has_extn("smtputf8"), s.esmtp_features
    refused = s.sendmail("zoë@platform.test", ["josé@exemple.test", "ascii@dest.test"], msg.encode("utf-8"), mail_options=["SMTPUTF8", "BODY=8BITMIME"])
    assert refused == {{}}, refused
print("ok")
"#,
        port = h.smtp.port()
    );
    let out = tool(python()).args(["-c", &script]).output().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn smtputf8_and_8bitmime_are_carried_to_an_upstream_that_offers_them() {
    let sink = Sink::start(Script {
        smtputf8: true,
        ..Default::default()
    });
    let h = Herald::start(&upstream(sink.port(), "none", ""));
    send_with_smtplib(&h);
    let got = sink.wait_for(1, 10);
    assert_eq!(got.len(), 1, "{}", h.log());
    let m = &got[0];
    assert_eq!(m.rcpts, vec!["josé@exemple.test", "ascii@dest.test"]);
    assert!(m.mail_params.contains("SMTPUTF8"), "{:?}", m.mail_params);
    assert!(
        m.mail_params.contains("BODY=8BITMIME"),
        "{:?}",
        m.mail_params
    );
    assert!(m.text().contains("Votre fichier est prêt."), "{}", m.text());

    // A client that asks for neither: neither goes out.
    let mut c = h.client();
    c.ehlo();
    assert_eq!(
        c.send("app@platform.test", &["plain@dest.test"], &message("x"))
            .0,
        250
    );
    let got = sink.wait_for(2, 10);
    let plain = got.iter().find(|m| m.rcpts == ["plain@dest.test"]).unwrap();
    assert!(
        !plain.mail_params.contains("SMTPUTF8"),
        "{:?}",
        plain.mail_params
    );
    assert!(
        !plain.mail_params.contains("BODY="),
        "{:?}",
        plain.mail_params
    );
}

#[test]
fn a_utf8_address_bounces_as_policy_at_an_upstream_without_smtputf8() {
    let sink = Sink::start(Script::default());
    let h = Herald::start(&upstream(sink.port(), "none", ""));
    send_with_smtplib(&h);
    let got = sink.wait_for(1, 10);
    assert_eq!(got.len(), 1, "{}", h.log());
    assert_eq!(got[0].rcpts, vec!["ascii@dest.test"], "the ASCII one goes");
    assert!(!got[0].mail_params.contains("SMTPUTF8"));
    assert!(got[0].mail_params.contains("BODY=8BITMIME"));
    assert!(
        !sink
            .state
            .lock()
            .unwrap()
            .rcpt_seen
            .iter()
            .any(|r| !r.is_ascii()),
        "a UTF-8 address was given to a server without SMTPUTF8"
    );
    let mut line = String::new();
    assert!(wait_until(10, || {
        let (_, out, _) = h.cli(&["history", "--rcpt", "josé@exemple.test", "--json"]);
        line = out
            .lines()
            .find(|l| l.contains("\"event\":\"bounced\""))
            .unwrap_or("")
            .to_string();
        !line.is_empty()
    }));
    assert!(line.contains("\"class\":\"policy\""), "{line}");
    assert!(
        line.contains("SMTPUTF8") && line.contains("RFC 6531"),
        "{line}"
    );
    let (_, out, _) = h.cli(&["suppression", "list"]);
    assert!(
        !out.contains("josé"),
        "a policy bounce never suppresses: {out}"
    );
}
