"""Run the CLI in-process the way the console script does; returns (exit code, stdout, stderr)."""

from raebench.cli import main


def run(argv, capsys):
    code = 0
    try:
        main(argv)
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err
