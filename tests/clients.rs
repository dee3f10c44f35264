//! herald with other people's SMTP clients: swaks and Python's smtplib.
//! Both come from `./test` (swaks from Debian, Python from .venv/); a missing
//! tool fails the test.

mod common;

use common::*;

#[test]
fn swaks_sends_through_herald() {
    let sink = Sink::start(Script::default());
    let h = Herald::start(&upstream(sink.port(), "none", ""));
    let out = tool("swaks")
        .args(["--server", &h.smtp.to_string()])
        .args(["--from", "app@platform.test", "--to", "louise@dest.test"])
        .args([
            "--header",
            "Subject: from swaks",
            "--body",
            ".leading dot\nline two",
        ])
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("<-  250 2.0.0 Ok: queued as"), "{log}");
    let msgs = sink.wait_for(1, 10);
    assert_eq!(msgs.len(), 1);
    let text = msgs[0].text();
    assert!(text.contains("Subject: from swaks"), "{text}");
    assert!(
        text.contains("\r\n.leading dot\r\n"),
        "dot-stuffing undone both ways: {text}"
    );
}

#[test]
fn swaks_sees_size_limit_and_auth_refusal() {
    let h = Herald::start(
        "[listen]\nsmtp = [\"{smtp}\"]\nmax_message_size = 500\nallowed_networks = []\n[[listen.users]]\nusername = \"p\"\npassword = \"right\"\n",
    );
    let out = tool("swaks")
        .args(["--server", &h.smtp.to_string(), "--to", "x@dest.test"])
        .args([
            "--auth",
            "PLAIN",
            "--auth-user",
            "p",
            "--auth-password",
            "wrong",
        ])
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(log.contains("535 5.7.8"), "{log}");
    let out = tool("swaks")
        .args(["--server", &h.smtp.to_string(), "--to", "x@dest.test"])
        .args([
            "--auth",
            "LOGIN",
            "--auth-user",
            "p",
            "--auth-password",
            "right",
        ])
        .args(["--body", &format!("{}\n", "x".repeat(70)).repeat(30)])
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(log.contains("235 2.7.0"), "{log}");
    assert!(log.contains("552 5.3.4"), "{log}");
}

#[test]
fn python_smtplib_sends_to_several_recipients() {
    let sink = Sink::start(Script::default());
    let h = Herald::start(&upstream(sink.port(), "none", ""));
    let script = format!(
        r#"
import smtplib
from email.message import EmailMessage
m = EmailMessage()
m["From"] = "Louise Miguès <louise@customer.test>"
m["To"] = "a@dest.test, b@dest.test"
m["Subject"] = "Nouveau fichier déposé"
m.set_content("Bonjour,\nvotre fichier est prêt.\n")
with smtplib.SMTP("127.0.0.1", {port}) as s:
    s.ehlo("py.test")
    assert s.has_extn("pipelining") and s.has_extn("size")
    refused = s.send_message(m, from_addr="app@platform.test", to_addrs=["a@dest.test", "b@dest.test"])
    assert refused == {{}}, refused
    try:
        s.sendmail("", ["nobody"], "Subject: x\r\n\r\nx\r\n")
        raise SystemExit("bad recipient was accepted")
    except smtplib.SMTPRecipientsRefused as e:
        assert e.recipients["nobody"][0] == 501, e.recipients
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
    let msgs = sink.wait_for(1, 10);
    assert_eq!(msgs[0].rcpts, vec!["a@dest.test", "b@dest.test"]);
    assert!(msgs[0].text().contains("=?utf-8?"), "{}", msgs[0].text());
}
