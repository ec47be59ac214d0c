//! Hand-checked expectations for the fixtures in `fixtures/`.
//!
//! Every expected value below was worked out from the fixture's bytes by hand (decoding the
//! encoded words, quoted-printable, base64 and charsets on paper), never taken from the
//! parser's output. Assertions on text rendered from HTML are `contains` checks, because the
//! exact layout of html2text output is not part of the contract.

use mailhook::model::{Attachment, Email};
use mailhook::parse::parse;

fn assert_contains(haystack: &str, needle: &str) {
    assert!(haystack.contains(needle), "expected to find {needle:?} in:\n{haystack}");
}

fn assert_not_contains(haystack: &str, needle: &str) {
    assert!(!haystack.contains(needle), "did not expect to find {needle:?} in:\n{haystack}");
}

fn attachment<'a>(email: &'a Email, name: &str) -> &'a Attachment {
    email
        .attachments
        .iter()
        .find(|a| a.name == name)
        .unwrap_or_else(|| panic!("no attachment named {name:?} in {:#?}", email.attachments))
}

// ---------------------------------------------------------------------------------------------
// Encodings
// ---------------------------------------------------------------------------------------------

#[test]
fn quoted_printable_utf8_body() {
    let email = parse(include_bytes!("../fixtures/enc-quoted-printable.eml"));
    assert_eq!(email.subject, "Ihre Rechnung 2026-11 ist da");
    assert_eq!(email.from.len(), 1);
    assert_eq!(email.from[0].name, "Stadtwerke Nord Kundenservice");
    assert_eq!(email.from[0].address, "rechnung@stadtwerke-nord.example.de");
    assert_eq!(email.to[0].name, "Thomas Mueller");
    assert_eq!(email.to[0].address, "t.mueller@example.net");
    assert_eq!(email.date, "2026-11-30T07:15:02+01:00");
    assert_eq!(email.message_id, "20261130061502.4F2A1C0042817@mailer.stadtwerke-nord.example.de");
    assert_contains(&email.text, "Sehr geehrter Herr Müller,");
    // Two soft line breaks joined, one of them between the octets of the euro sign.
    assert_contains(
        &email.text,
        "Ihre Rechnung für November 2026 steht ab sofort im Kundenportal bereit. \
         Der Rechnungsbetrag von 84,20 € wird am 15.12.2026 von Ihrem Konto abgebucht.",
    );
    assert_contains(&email.text, "https://portal.stadtwerke-nord.example.de/rechnung?nr=2026-11-0042817");
    assert_contains(&email.text, "Freundliche Grüße");
    assert_contains(&email.text, "-- ");
    assert_not_contains(&email.text, "=C3");
    assert_not_contains(&email.text, "=3D");
    assert_not_contains(&email.text, "=\r\n");
    assert_not_contains(&email.text, "\u{FFFD}");
    assert_eq!(email.html, "");
    assert!(email.attachments.is_empty(), "{:#?}", email.attachments);
    assert!(email.problems.is_empty(), "{:?}", email.problems);
}

#[test]
fn base64_utf8_body() {
    let email = parse(include_bytes!("../fixtures/enc-base64.eml"));
    assert_eq!(email.subject, "Password expiry notice: 5 days remaining");
    assert_eq!(email.from[0].name, "IT-support");
    assert_eq!(email.from[0].address, "it-support@norrsken-it.example.se");
    assert_eq!(email.to[0].address, "asa.lindqvist@norrsken-it.example.se");
    assert_eq!(email.date, "2026-12-01T06:00:00+01:00");
    assert_eq!(email.message_id, "pwexpire.asa.lindqvist.20261201@idm.norrsken-it.example.se");
    assert_contains(&email.text, "Hej Åsa,");
    assert_contains(&email.text, "ditt lösenord för kontot asa.lindqvist går ut om 5 dagar (2026-12-06).");
    assert_contains(&email.text, "https://konto.norrsken-it.example.se/byt-losenord");
    assert_contains(&email.text, "Med vänliga hälsningar");
    assert_contains(&email.text, "IT-supporten, Norrsken AB");
    assert_eq!(email.header("Auto-Submitted"), Some("auto-generated"));
    assert!(email.problems.is_empty(), "{:?}", email.problems);
}

#[test]
fn iso_8859_1_body_and_q_encoded_subject() {
    let email = parse(include_bytes!("../fixtures/enc-iso-8859-1.eml"));
    assert_eq!(email.subject, "Confirmation de votre réservation n° QXK7PL");
    assert_eq!(email.from[0].name, "Service Client Rail Alpes");
    assert_eq!(email.from[0].address, "confirmation@rail-alpes.example.fr");
    assert_eq!(email.date, "2026-12-02T18:42:10+01:00");
    assert_eq!(email.message_id, "QXK7PL.1764697330@booking.rail-alpes.example.fr");
    assert_contains(&email.text, "Bonjour Mme Lefèvre,");
    assert_contains(&email.text, "Nous vous confirmons votre réservation n° QXK7PL.");
    assert_contains(&email.text, "Aller : Paris Gare de Lyon -> Zürich HB");
    assert_contains(&email.text, "Départ : lundi 14/12/2026 à 08h19");
    assert_contains(&email.text, "Arrivée : lundi 14/12/2026 à 12h23");
    assert_contains(&email.text, "Prix total : 129,00 EUR");
    assert_not_contains(&email.text, "\u{FFFD}");
    assert!(email.problems.is_empty(), "{:?}", email.problems);
}

#[test]
fn windows_1252_body_and_b_encoded_display_name() {
    let email = parse(include_bytes!("../fixtures/enc-windows-1252.eml"));
    assert_eq!(email.subject, "Payment reminder: invoice INV-20931");
    assert_eq!(email.from[0].name, "Dupré Supplies – Accounts");
    assert_eq!(email.from[0].address, "accounts@dupre-supplies.example.co.uk");
    assert_eq!(email.to[0].address, "payables@example.com");
    assert_eq!(email.date, "2026-11-30T11:05:33Z");
    assert_eq!(email.message_id, "000a01db4c2e$5f3e2c10$1dba8430$@dupre-supplies.example.co.uk");
    // 0x93/0x94 curly quotes, 0x80 euro sign, 0x96 en dash.
    assert_contains(&email.text, "invoice “INV-20931” for €1,250.00 is now 14 days overdue – please");
    assert_contains(&email.text, "Amount due:   €1,250.00");
    // 0x92 right single quotation mark.
    assert_contains(&email.text, "If you’ve already paid, please disregard this reminder.");
    assert_contains(&email.text, "Accounts receivable – Dupré Supplies Ltd");
    assert_not_contains(&email.text, "\u{FFFD}");
    // C1 control characters would mean the bytes were read as ISO-8859-1.
    assert_not_contains(&email.text, "\u{0093}");
    assert_not_contains(&email.text, "\u{0080}");
    assert_eq!(email.header("X-Mailer"), Some("Microsoft Outlook 16.0"));
}

#[test]
fn utf8_subject_from_adjacent_b_and_q_encoded_words() {
    let email = parse(include_bytes!("../fixtures/enc-utf8-subject.eml"));
    // The folding whitespace between the two encoded words is not part of the subject;
    // the space before the dash is an encoded `_` inside the second word.
    assert_eq!(email.subject, "Grüße aus München – 20 € 🎉");
    assert_eq!(email.header("Subject"), Some("Grüße aus München – 20 € 🎉"));
    assert_eq!(email.from[0].name, "Jürgen Bläser");
    assert_eq!(email.from[0].address, "juergen.blaeser@cafe-zentral.example.de");
    assert_eq!(email.date, "2026-12-04T16:20:00+01:00");
    assert_eq!(email.message_id, "gutschein-8813@cafe-zentral.example.de");
    assert_contains(&email.text, "als Dankeschön für Ihre Treue schenken wir Ihnen einen Gutschein über 20 €.");
    assert_contains(&email.text, "Code: ZENTRAL-20-8813, gültig bis 31.01.2027.");
    assert!(email.problems.is_empty(), "{:?}", email.problems);
}

// ---------------------------------------------------------------------------------------------
// Structure
// ---------------------------------------------------------------------------------------------

#[test]
fn html_only_mail_is_rendered_as_text() {
    let email = parse(include_bytes!("../fixtures/html-only.eml"));
    assert_eq!(email.subject, "Daily backup report for 2026-11-30");
    assert_eq!(email.from[0].name, "Backup Reports");
    assert_eq!(email.from[0].address, "backup-reports@nas01.example.com");
    assert_eq!(email.date, "2026-12-01T02:00:04+01:00");
    assert_eq!(email.message_id, "backup-report-20261130@nas01.example.com");

    // The HTML is kept as it came.
    assert_contains(&email.html, "<table border=\"1\"");
    assert_contains(&email.html, "<td class=\"failed\">Failed</td>");
    assert_contains(&email.html, "<script");

    // The text is made from it: entities decoded, every cell present as its own word.
    assert_contains(&email.text, "Backup & Restore: daily report");
    assert_contains(&email.text, "2 tasks ran on nas01 during the night.");
    for cell in ["fileserver", "Succeeded", "412GB", "mailarchive", "Failed", "0GB"] {
        let found = email.text.split(|c: char| c.is_whitespace() || c == '│' || c == '|').any(|word| word == cell);
        assert!(found, "cell {cell:?} is not a separate word in:\n{}", email.text);
    }
    assert_contains(&email.text, "Check the task log on the NAS for details.");
    // No markup, no CSS, no script.
    assert_not_contains(&email.text, "<td");
    assert_not_contains(&email.text, "<table");
    assert_not_contains(&email.text, "&amp;");
    assert_not_contains(&email.text, "font-family");
    assert_not_contains(&email.text, "#2e7d32");
    assert_not_contains(&email.text, "td.ok");
    assert_not_contains(&email.text, "reportBeacon");
    assert_not_contains(&email.text, "hiddenTrackingMarker");
    assert_not_contains(&email.text, "document.write");
    assert!(email.attachments.is_empty(), "{:#?}", email.attachments);
}

#[test]
fn multipart_alternative_text_is_the_plain_part() {
    let email = parse(include_bytes!("../fixtures/multipart-alternative.eml"));
    assert_eq!(email.subject, "Your statement for November 2026 is ready");
    assert_eq!(email.from[0].name, "Nordbank Online");
    assert_eq!(email.from[0].address, "no-reply@nordbank.example.com");
    assert_eq!(email.to[0].name, "Maria Jensen");
    assert_eq!(email.to[0].address, "maria.jensen@example.dk");
    assert_eq!(email.date, "2026-12-03T08:00:00+01:00");
    assert_eq!(email.message_id, "stmt-2026-11-55120398@notify.nordbank.example.com");

    // Only the plain part says "View it online:"; only the HTML part says "Click here".
    assert_contains(&email.text, "your account statement for November 2026 is ready.");
    assert_contains(&email.text, "View it online: https://online.nordbank.example.com/statements/2026-11");
    assert_not_contains(&email.text, "Click here");
    assert_not_contains(&email.text, "<p>");
    assert_not_contains(&email.text, "This is a multi-part message in MIME format.");

    assert_contains(&email.html, "<p>your account statement for <b>November 2026</b> is ready.");
    assert_contains(&email.html, "Click here to view your statement</a>");
    assert_not_contains(&email.html, "View it online:");
    assert!(email.attachments.is_empty(), "{:#?}", email.attachments);
}

#[test]
fn attachments_names_types_and_sizes() {
    let email = parse(include_bytes!("../fixtures/attachments.eml"));
    assert_eq!(email.subject, "Bestellung März 2027 und Rechnung 2027-0311");
    assert_eq!(email.from[0].name, "Einkauf Kaffeehaus Nord");
    assert_eq!(email.from[0].address, "einkauf@kaffeehaus-nord.example.de");
    assert_eq!(email.to[0].address, "bestellungen@roesterei.example.de");
    assert_eq!(email.cc.len(), 1);
    assert_eq!(email.cc[0].address, "buchhaltung@kaffeehaus-nord.example.de");
    assert_eq!(email.date, "2027-03-03T10:12:45+01:00");
    assert_eq!(email.message_id, "5E8C2B1F.7070409@kaffeehaus-nord.example.de");

    assert_contains(&email.text, "anbei unsere Bestellung für März als CSV und die Rechnung 2027-0311 als PDF.");
    assert_contains(&email.text, "Mit freundlichen Grüßen");
    assert_not_contains(&email.text, "<p>");
    assert_contains(&email.html, "cid:logo.5E8C2B1F@kaffeehaus-nord.example.de");

    assert_eq!(email.attachments.len(), 3, "{:#?}", email.attachments);

    let pdf = attachment(&email, "Rechnung-2027-0311.pdf");
    assert_eq!(pdf.content_type, "application/pdf");
    assert_eq!(pdf.size, 224);
    assert!(pdf.message.is_none());

    // RFC 2231: filename*=UTF-8''Bestellung%20M%C3%A4rz.csv
    let csv = attachment(&email, "Bestellung März.csv");
    assert_eq!(csv.content_type, "text/csv");
    assert_eq!(csv.size, 174);

    let png = attachment(&email, "logo.png");
    assert_eq!(png.content_type, "image/png");
    assert_eq!(png.size, 70);
}

#[test]
fn forwarded_message_rfc822_is_parsed() {
    let email = parse(include_bytes!("../fixtures/forwarded-rfc822.eml"));
    assert_eq!(email.subject, "Fwd: Order 4711 cancelled by customer");
    assert_eq!(email.from[0].name, "Lena Hoffmann");
    assert_eq!(email.from[0].address, "lena.hoffmann@example.com");
    assert_eq!(email.date, "2026-11-30T09:12:31+01:00");
    assert_eq!(email.message_id, "c0ffee42-7d1e-4b7a-9f3e-2a1b5c6d7e8f@example.com");
    assert_contains(&email.text, "Hi team, please refund this one. The original notification is attached.");
    // The forwarded message's body is not the outer body.
    assert_not_contains(&email.text, "Reason given");

    assert_eq!(email.attachments.len(), 1, "{:#?}", email.attachments);
    let fwd = &email.attachments[0];
    assert_eq!(fwd.content_type, "message/rfc822");
    assert_eq!(fwd.name, "Order 4711 cancelled by customer.eml");
    let inner = fwd.message.as_ref().expect("the forwarded message is parsed");
    assert_eq!(inner.subject, "Order 4711 cancelled by customer");
    assert_eq!(inner.from[0].name, "Example Shop");
    assert_eq!(inner.from[0].address, "noreply@shop.example.com");
    assert_eq!(inner.to[0].address, "orders@example.com");
    assert_eq!(inner.date, "2026-11-29T21:04:55+01:00");
    assert_eq!(inner.message_id, "order-4711-cancel@shop.example.com");
    assert_contains(&inner.text, "Order 4711 was cancelled by the customer (john.doe@example.org).");
    assert_contains(&inner.text, "Amount to refund: 59.90 EUR");
}

// ---------------------------------------------------------------------------------------------
// Malformed input: whatever is readable is read, and the rest is reported
// ---------------------------------------------------------------------------------------------

#[test]
fn malformed_missing_boundary_keeps_body_text() {
    let email = parse(include_bytes!("../fixtures/malformed-missing-boundary.eml"));
    assert_eq!(email.subject, "Job nightly-db completed with warnings");
    assert_eq!(email.from[0].address, "backupexec@backup01.example.com");
    assert_eq!(email.date, "2026-12-01T03:47:12+01:00");
    assert_eq!(email.message_id, "BE.20261201034712.1187@backup01.example.com");
    assert_contains(&email.text, "Job name: nightly-db");
    assert_contains(&email.text, "Status: completed with warnings");
    assert_contains(&email.text, "Warning: 3 files were skipped because they were in use.");
    assert_contains(&email.text, "Data size: 18.4 GB, elapsed time 00:41:07");
    assert!(email.attachments.is_empty(), "{:?}", email.attachments);
    assert!(email.problems.iter().any(|p| p.contains("boundary")), "{:?}", email.problems);
}

#[test]
fn malformed_bad_charset_is_read_and_reported() {
    let email = parse(include_bytes!("../fixtures/malformed-bad-charset.eml"));
    assert_eq!(email.subject, "Toner low on HP-LJ-4OG-East");
    assert_eq!(email.from[0].name, "Printer Fleet Monitor");
    assert_eq!(email.from[0].address, "printers@print01.example.com");
    assert_eq!(email.date, "2026-12-01T10:02:59+01:00");
    assert_eq!(email.message_id, "tonerlow.4og-east.1764579779@print01.example.com");
    assert_contains(&email.text, "Printer: HP-LJ-4OG-East (4th floor, east wing)");
    assert_contains(&email.text, "Black toner level: 5 percent");
    assert_contains(&email.text, "Please replace the cartridge (HP 59A) soon.");
    assert!(email.problems.iter().any(|p| p.contains("x-no-such-charset")), "{:?}", email.problems);
}

#[test]
fn malformed_truncated_base64_keeps_what_decodes() {
    let email = parse(include_bytes!("../fixtures/malformed-truncated-base64.eml"));
    assert_eq!(email.subject, "Your contact export is ready");
    assert_eq!(email.from[0].name, "Example CRM");
    assert_eq!(email.from[0].address, "no-reply@crm.example.com");
    assert_eq!(email.date, "2026-12-01T14:30:00-05:00");
    assert_eq!(email.message_id, "export-88f1c2@crm.example.com");
    // Two complete 76-character lines decode to the first 114 bytes; the last line's seven
    // complete quanta add 21 more ("The archive cont"); its three trailing characters are a
    // broken quantum.
    assert_contains(&email.text, "Your export of 2,341 contacts is complete.");
    assert_contains(&email.text, "Download the file within 7 days from https://crm.example.com/exports/88f1c2");
    assert_contains(&email.text, "The archive cont");
    assert_not_contains(&email.text, "README");
    assert!(email.problems.iter().any(|p| p.contains("truncated")), "{:?}", email.problems);
}

#[test]
fn malformed_8bit_headers_keep_their_ascii() {
    let email = parse(include_bytes!("../fixtures/malformed-8bit-headers.eml"));
    // Subject is raw UTF-8 "Störung behoben: Drucker im 2. OG"; From is raw Latin-1 "Jörg Weiß":
    // the UTF-8 line is kept, the Latin-1 line is read as Windows-1252 (a superset of Latin-1).
    assert_eq!(email.subject, "Störung behoben: Drucker im 2. OG");
    assert_eq!(email.from.len(), 1);
    assert_eq!(email.from[0].address, "joerg.weiss@example.de");
    assert_eq!(email.from[0].name, "Jörg Weiß");
    assert!(email.problems.iter().any(|p| p.contains("Windows-1252")), "{:?}", email.problems);
    assert_eq!(email.to[0].address, "helpdesk@example.de");
    assert_eq!(email.date, "2026-12-02T13:37:00+01:00");
    assert_eq!(email.message_id, "20261202133700.GA4711@ws-jweiss.example.de");
    assert_contains(&email.text, "der Drucker im 2. OG druckt wieder. Der Papierstau ist behoben.");
    assert_contains(&email.text, "Jörg");
}

#[test]
fn malformed_no_headers_is_all_body() {
    let email = parse(include_bytes!("../fixtures/malformed-no-headers.eml"));
    assert_eq!(email.subject, "");
    assert_eq!(email.message_id, "");
    assert_eq!(email.date, "");
    assert!(email.from.is_empty(), "{:?}", email.from);
    assert_contains(&email.text, "largest directories: /var/log/journal 14G, /var/lib/docker 9G");
    assert_contains(&email.text, "please clean up old logs before the weekend");
    assert!(!email.problems.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Notification fixtures used by the example rules
// ---------------------------------------------------------------------------------------------

#[test]
fn shop_order_html_only_windows_1252_quoted_printable() {
    let email = parse(include_bytes!("../fixtures/shop-order.eml"));
    assert_eq!(email.subject, "Bestellung Nr. 100234 bei Kaffeerösterei Hansen");
    assert_eq!(email.from[0].name, "Kaffeerösterei Hansen");
    assert_eq!(email.from[0].address, "bestellung@kaffee-hansen.example.de");
    assert_eq!(email.to[0].address, "Anna.Schmidt@example.org");
    assert_eq!(email.date, "2026-11-30T21:17:43+01:00");
    assert_eq!(email.header("X-Mailer"), Some("osCommerce Mailer"));
    // html is the decoded source: soft breaks joined, =3D decoded, 0xE4 → ä, 0x80 → €.
    assert_contains(&email.html, "<td colspan=\"2\">100234</td>");
    assert_contains(&email.html, "<title>Bestellbestätigung</title>");
    assert_contains(&email.html, "<b>Summe:</b></td><td align=\"right\"><b>1.211,55&nbsp;&euro;</b>");
    assert_contains(&email.html, "Versandkostenfrei ab 50 € Bestellwert.");
    // text is rendered from it: entities decoded, no markup.
    assert_contains(&email.text, "Hallo Anna Schmidt,");
    assert_contains(&email.text, "Siebträgermaschine \"Barista Pro\"");
    assert_contains(&email.text, "1.211,55");
    assert_contains(&email.text, "€");
    assert_contains(&email.text, "Vorkasse / Überweisung");
    assert_not_contains(&email.text, "&nbsp;");
    assert_not_contains(&email.text, "&euro;");
    assert_not_contains(&email.text, "<td");
    assert_not_contains(&email.text, "\u{FFFD}");
}

#[test]
fn ups_notice_text_comes_from_the_plain_part() {
    let email = parse(include_bytes!("../fixtures/shipping-ups.eml"));
    assert_eq!(email.subject, "UPS Update: Package Scheduled for Delivery Tomorrow – Order 4711");
    assert_eq!(email.from[0].address, "pkginfo@ups.com");
    assert_eq!(email.date, "2026-11-30T18:04:37-05:00");
    assert_contains(&email.text, "Tracking Number: 1Z999AA10123456784");
    assert_contains(&email.text, "Scheduled Delivery: Tuesday, 12/01/2026");
    assert_contains(&email.text, "Track your package: https://www.ups.com/track?loc=en_US&tracknum=1Z999AA10123456784");
    assert_contains(&email.text, "© 2026 United Parcel Service of America, Inc.");
    assert_not_contains(&email.text, "<strong>");
    assert_contains(&email.html, "Scheduled Delivery: <strong>Tuesday, 12/01/2026</strong>");
}

#[test]
fn cron_mail_headers_and_comment_address() {
    let email = parse(include_bytes!("../fixtures/batch-cron-failure.eml"));
    assert_eq!(email.subject, "Cron <root@batch01> /usr/local/bin/nightly-export.sh");
    // "root@batch01.example.com (Cron Daemon)": the comment is not part of the address.
    assert_eq!(email.from[0].address, "root@batch01.example.com");
    // "Tue,  1 Dec 2026 02:00:01 +0100 (CET)"
    assert_eq!(email.date, "2026-12-01T02:00:01+01:00");
    assert_eq!(email.message_id, "20261201010001.3F1A2C1E0B@batch01.example.com");
    let env: Vec<&str> = email.headers_named("x-cron-env").collect();
    assert_eq!(env, ["<SHELL=/bin/sh>", "<HOME=/root>", "<PATH=/usr/bin:/bin>", "<LOGNAME=root>"]);
    assert_contains(&email.text, "FATAL:  password authentication failed for user \"export\"");
    assert_contains(&email.text, "nightly-export: export aborted, exit code 3");
}

#[test]
fn erp_job_mail_custom_headers() {
    let email = parse(include_bytes!("../fixtures/batch-job-failed.eml"));
    assert_eq!(email.subject, "Job EXPORT_ORDERS (run 88231) failed with exit code 2");
    assert_eq!(email.header("X-Job-Id"), Some("88231"));
    assert_eq!(email.header("x-job-host"), Some("erp01.example.com"));
    assert_eq!(email.cc.len(), 2);
    assert_eq!(email.cc[0].address, "it-oncall@example.com");
    assert_eq!(email.cc[1].name, "Dana Kowalski");
    assert_eq!(email.cc[1].address, "dana.kowalski@example.com");
    assert_contains(&email.text, "ORA-12170: TNS:Connect timeout occurred (target: EDIDB01)");
}

#[test]
fn monitoring_alert_plain_ascii() {
    let email = parse(include_bytes!("../fixtures/monitoring-problem.eml"));
    assert_eq!(email.subject, "** PROBLEM Service Alert: web01.example.com/HTTP is CRITICAL **");
    assert_eq!(email.from[0].name, "Nagios");
    assert_eq!(email.from[0].address, "nagios@monitor.example.com");
    assert_eq!(email.date, "2026-12-01T09:30:00+01:00");
    assert_eq!(email.message_id, "20261201083000.7A1F2C3B4D@monitor.example.com");
    assert_eq!(
        email.text,
        "***** Nagios *****\n\nNotification Type: PROBLEM\n\nService: HTTP\n\
         Host: web01.example.com\nAddress: 192.0.2.21\nState: CRITICAL\n\n\
         Date/Time: Tue Dec 1 09:30:00 CET 2026\n\nAdditional Info:\n\n\
         CRITICAL - Socket timeout after 10 seconds\n"
    );
    assert!(email.problems.is_empty(), "{:?}", email.problems);
}

// ---------------------------------------------------------------------------------------------
// Real-world damage: what other parsers read, and a person sees in a mail client
// ---------------------------------------------------------------------------------------------

#[test]
fn encoded_words_with_raw_8bit_bytes_are_decoded_once() {
    let email = parse(include_bytes!("../fixtures/malformed-8bit-encoded-word.eml"));
    // =?iso-8859-1?Q?...Fr<0xF6>sche?=: the raw byte is ISO-8859-1 "ö".
    assert_eq!(email.subject, "Die Hasen und die Frösche");
    // =?iso-8859-7?Q?<C1 E8 E7 ED E1>_K?=: Greek capital alpha, theta, eta, nu, alpha.
    assert_eq!(email.to[0].name, "Αθηνα K");
    assert_eq!(email.to[0].address, "athina.k@example.gr");
    // Raw bytes outside an encoded word: Windows-1252 "ö" and "ß".
    assert_eq!(email.from[0].name, "Jörg Weiß");
    assert_eq!(email.text, "Es waren einmal die Hasen und die Frösche.\n");
    assert_not_contains(&email.subject, "Ã");
}

#[test]
fn headers_after_a_blank_line_a_bom_or_a_stray_line_are_kept() {
    let email = parse(include_bytes!("../fixtures/malformed-leading-blank-line.eml"));
    assert_eq!(email.from[0].address, "backup@nas01.example.com");
    assert_eq!(email.subject, "Backup finished: 3 volumes");
    assert_eq!(email.text, "All 3 volumes were backed up.\n");

    let email = parse(include_bytes!("../fixtures/malformed-byte-order-mark.eml"));
    assert_eq!(email.from[0].name, "Lagerverwaltung");
    assert_eq!(email.from[0].address, "lager@example.de");
    assert_eq!(email.subject, "Bestand niedrig: Artikel 4711");
    assert_eq!(email.text, "Artikel 4711 (Espresso Classico) hat nur noch 3 Stück.\n");

    let email = parse(include_bytes!("../fixtures/malformed-first-header.eml"));
    assert_eq!(email.from[0].address, "alerts@monitor.example.com");
    assert_eq!(email.subject, "PROBLEM: disk /var on db1 is 95% full");
    assert_eq!(email.text, "Disk /var on db1 is 95% full.\n");
    assert!(email.headers.iter().all(|h| !h.name.contains(' ')), "{:?}", email.headers);
}

#[test]
fn obsolete_header_syntax_is_read() {
    let email = parse(include_bytes!("../fixtures/malformed-obsolete-header-syntax.eml"));
    assert_eq!(email.from[0].name, "John Doe");
    assert_eq!(email.from[0].address, "jdoe@machine.example");
    assert_eq!(email.to[0].name, "Mary Smith");
    assert_eq!(email.to[0].address, "mary@example.net");
    assert_eq!(email.subject, "Saying Hello");
    assert_eq!(email.date, "1997-11-21T09:55:06-06:00");
    assert_eq!(email.message_id, "1234@local.machine.example");
    assert_eq!(email.text, "This is a message just to say hello.\nSo, \"Hello\".\n");
    assert!(email.problems.is_empty(), "{:?}", email.problems);
}

#[test]
fn utf8_under_a_wrong_charset_label_is_read_as_utf8() {
    let email = parse(include_bytes!("../fixtures/malformed-utf8-declared-gb2312.eml"));
    assert_eq!(email.from[0].name, "示例商城");
    assert_eq!(email.subject, "订单 10086 已发货");
    assert_eq!(email.text, "您好，您的订单 10086 已发货。\n");
    assert!(email.problems.iter().any(|p| p.contains("GB2312")), "{:?}", email.problems);

    let email = parse(include_bytes!("../fixtures/malformed-utf8-declared-us-ascii.eml"));
    assert_eq!(email.text, "Grüße aus München: Zählerstand 12345 kWh.\n");
    assert!(email.problems.iter().any(|p| p.contains("us-ascii")), "{:?}", email.problems);
}

#[test]
fn an_empty_plain_alternative_gives_way_to_the_html() {
    let email = parse(include_bytes!("../fixtures/multipart-empty-plain-alternative.eml"));
    assert_contains(&email.text, "Your order 4711 has shipped.");
    assert_contains(&email.text, "Tracking: 1Z999AA10123456784");
    assert_contains(&email.html, "<p>Tracking: 1Z999AA10123456784</p>");
}

#[test]
fn text_has_lf_line_endings_whatever_the_file_has() {
    let lf = parse(include_bytes!("../fixtures/lf-line-endings.eml"));
    assert_eq!(lf.text, "rotated 14 files\nfreed 2.1 GB\n");
    let crlf = parse(&include_bytes!("../fixtures/lf-line-endings.eml").iter().fold(Vec::new(), |mut v, &b| {
        if b == b'\n' {
            v.push(b'\r');
        }
        v.push(b);
        v
    }));
    assert_eq!(crlf, lf);
}
