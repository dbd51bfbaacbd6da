import subprocess
import sys

from selfattn import backends, cli


def test_info_lists_every_backend():
    text = cli.info()
    for name in backends.names():
        assert name in text
    assert "reference" in text


def test_python_m_selfattn_runs_offline():
    out = subprocess.run([sys.executable, "-m", "selfattn", "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "backends (priority order)" in out.stdout


def test_version_is_the_package_version(capsys):
    import selfattn

    try:
        cli.main(["--version"])
    except SystemExit as stop:
        assert stop.code == 0, stop.code
    assert capsys.readouterr().out.strip() == f"selfattn {selfattn.__version__}"
