"""No URL's password or query values in what distpddm prints or logs (credentials in the environment or the
AWS config files never reach a message; a URL can carry its own)."""

from __future__ import annotations

import logging
import sys

from distpddm.redact import RedactFilter, redact, redacted_output


def test_passwords_tokens_and_query_values_are_hidden_and_the_rest_kept():
    assert (
        redact("shard https://ann:pa55w0rd@host:8443/a/b.tar failed")
        == "shard https://ann:***@host:8443/a/b.tar failed"
    )
    assert redact("https://ghp_abc123@host/x.tar") == "https://***@host/x.tar"
    assert redact("s3://b/x.tar?X-Amz-Signature=f00&X-Amz-Credential=AKIA%2F1&flag") == (
        "s3://b/x.tar?X-Amz-Signature=***&X-Amz-Credential=***&flag"
    )
    # what is not a secret stays as it was: a plain URL, an offset after a path, text without a URL
    for text in ("http://127.0.0.1:80/in12k-{0000..0009}.tar@512+100 (k.1)", "/data/a@b.tar", "no url: a@b"):
        assert redact(text) == text
    assert redact("'http://u:p@h/x' and \"https://v:q@h/y\"") == "'http://u:***@h/x' and \"https://v:***@h/y\""
    # a user name that is an address, an "@" in a password, a SAS token whose values hold colons, ";" between
    # parameters, a token in the fragment, a message's punctuation after the URL
    assert redact("https://me@corp.com:pw@host/x") == "https://me@corp.com:***@host/x"
    assert redact("https://u:p@ss@host/x") == "https://u:***@host/x"
    sas = "https://acct.blob.core.windows.net/c/x.tar?sp=r&st=2023-05-10T13:44:19Z&sig=S3CR3T%2B"
    assert redact(f"GET {sas}: 403") == ("GET https://acct.blob.core.windows.net/c/x.tar?sp=***&st=***&sig=***: 403")
    assert redact("(http://h/x?a=1;sig=S3CR3T).") == "(http://h/x?a=***;sig=***)."
    assert redact("http://h/cb#access_token=S3CR3T&x=1") == "http://h/cb#access_token=***&x=***"


def test_log_records_and_their_tracebacks_are_redacted(caplog):
    log = logging.getLogger("distpddm.test_redact")
    caplog.handler.addFilter(RedactFilter())
    try:
        raise OSError("GET https://u:hunter2@h/s.tar?sig=xyz: 503")
    except OSError:
        log.exception("shard %s unreadable", "https://u:hunter2@h/s.tar")
    text = caplog.text
    assert "hunter2" not in text and "xyz" not in text
    assert "shard https://u:***@h/s.tar unreadable" in text and "sig=***: 503" in text


def test_the_cli_output_is_redacted_while_a_command_runs(capsys):
    with redacted_output():
        print("error: https://u:hunter2@h/s.tar: gone", file=sys.stderr)
        print("read http://h/x.tar?token=abc")
    print("after: https://u:hunter2@h/")  # the streams are given back
    out, err = capsys.readouterr()
    assert err == "error: https://u:***@h/s.tar: gone\n"
    assert out == "read http://h/x.tar?token=***\nafter: https://u:hunter2@h/\n"


def test_an_error_nothing_catches_is_printed_redacted(tmp_path):
    """`distpddm` in its own process, failing with an error no command catches (forced here): Python's
    traceback goes through the CLI's excepthook, redacted."""
    import subprocess

    code = (
        "import sys\n"
        "from distpddm import cli\n"
        "from distpddm.data import wdsindex\n"
        "def fails(*a, **k):\n"
        "    raise RuntimeError('GET https://u:hunter2@h/s.tar?sig=xyz failed')\n"
        "wdsindex.index_shards = fails\n"
        "sys.exit(cli.main(sys.argv[1:]))\n"
    )
    args = ["shards", "index", "https://u:hunter2@h/s.tar", str(tmp_path / "out"), "--quiet"]
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "hunter2" not in r.stderr + r.stdout and "xyz" not in r.stderr
    assert "Traceback" in r.stderr and "RuntimeError: GET https://u:***@h/s.tar?sig=*** failed" in r.stderr
