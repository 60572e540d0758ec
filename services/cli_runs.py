"""`mtprl runs …`: a thin terminal client of the REST API.

    mtprl runs start spec.yaml [--idempotency-key K]   mtprl runs list [--state running]
    mtprl runs show ID    mtprl runs pause|resume|cancel ID    mtprl runs watch ID

Server and token: ``--url`` / ``MTPRL_URL`` (default http://127.0.0.1:8000) and ``--token`` /
``MTPRL_API_TOKEN`` (default: the token file in ``MTPRL_DATA_DIR``, ~/.mtprl). Exit status 1 on
an HTTP error (the server's message is printed), and for ``watch`` when the run does not
complete. Mount in ``services/cli.py`` with ``app.add_typer(cli_runs.app, name="runs")``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Optional

import httpx
import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Start, inspect and steer runs.")

UrlOpt = Annotated[str, typer.Option("--url", envvar="MTPRL_URL", help="Control plane URL.")]
TokenOpt = Annotated[Optional[str], typer.Option("--token", envvar="MTPRL_API_TOKEN", help="API token.", show_default=False)]
DEFAULT_URL = "http://127.0.0.1:8000"
HEADLINE = ("batch/reward_mean", "batch/accuracy", "loss/total", "ratio/clip_frac",
            "rollout/spec_acceptance_rate", "rollout/tokens_per_s")


def _token(token: str | None) -> str:
    if token:
        return token
    path = Path(os.path.expanduser(os.environ.get("MTPRL_DATA_DIR", "~/.mtprl"))) / "api_token"
    if path.exists():
        return path.read_text().strip()
    typer.echo("no API token: pass --token or set MTPRL_API_TOKEN", err=True)
    raise typer.Exit(2)


def _client(url: str, token: str | None, timeout: float | None = 30.0) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {_token(token)}"}, timeout=timeout)


def _check(r: httpx.Response) -> Any:
    if r.status_code >= 400:
        try:
            detail = r.json().get("detail", r.text)
        except ValueError:
            detail = r.text
        if isinstance(detail, list):  # 422: one line per offending field
            detail = "\n".join(f"  {'.'.join(str(x) for x in e.get('loc', []))}: {e.get('msg')}" for e in detail)
        typer.echo(f"error {r.status_code}:\n{detail}" if "\n" in str(detail) else f"error {r.status_code}: {detail}", err=True)
        raise typer.Exit(1)
    return r.json()


def _print(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2))


def load_spec(path: Path) -> dict[str, Any]:
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(text)
    return json.loads(text)


@app.command()
def start(
    spec: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Run spec, YAML or JSON.")],
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    idempotency_key: Annotated[Optional[str], typer.Option(help="Repeat-safe creation key.")] = None,
) -> None:
    """Create and start a run; prints it."""
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    with _client(url, token) as c:
        _print(_check(c.post("/v1/runs", json=load_spec(spec), headers=headers)))


@app.command("list")
def list_(
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    state: Annotated[Optional[str], typer.Option(help="Only runs in this state.")] = None,
    limit: int = 50,
    offset: int = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw page.")] = False,
) -> None:
    """Runs, newest first."""
    params: dict[str, Any] = {"limit": limit, "offset": offset}
    if state:
        params["state"] = state
    with _client(url, token) as c:
        page = _check(c.get("/v1/runs", params=params))
    if as_json:
        _print(page)
        return
    typer.echo(f"{'ID':<14}{'STATE':<11}{'STEP':>10}  {'NAME':<24}CREATED")
    for r in page["data"]:
        total = r.get("total_steps") or "?"
        typer.echo(f"{r['id']:<14}{r['state']:<11}{str(r['step']) + '/' + str(total):>10}  "
                   f"{(r.get('name') or '-')[:23]:<24}{r['created_at']}")
    typer.echo(f"({len(page['data'])} of {page['count']})")


@app.command()
def show(run_id: str, url: UrlOpt = DEFAULT_URL, token: TokenOpt = None) -> None:
    """One run: state, step, latest metrics, last checkpoint, error."""
    with _client(url, token) as c:
        _print(_check(c.get(f"/v1/runs/{run_id}")))


def _action(action: str, run_id: str, url: str, token: str | None) -> None:
    with _client(url, token) as c:
        r = _check(c.post(f"/v1/runs/{run_id}/{action}"))
    typer.echo(f"{r['id']}: {r['state']}")


@app.command()
def pause(run_id: str, url: UrlOpt = DEFAULT_URL, token: TokenOpt = None) -> None:
    """running → paused."""
    _action("pause", run_id, url, token)


@app.command()
def resume(run_id: str, url: UrlOpt = DEFAULT_URL, token: TokenOpt = None) -> None:
    """paused → running."""
    _action("resume", run_id, url, token)


@app.command()
def cancel(run_id: str, url: UrlOpt = DEFAULT_URL, token: TokenOpt = None) -> None:
    """Stop a run for good."""
    _action("cancel", run_id, url, token)


def iter_sse(lines: Any) -> Any:
    """(event, data) pairs from an iterator of SSE lines."""
    event, data = None, []
    for line in lines:
        if line == "":
            if data:
                yield event or "message", json.loads("\n".join(data))
            event, data = None, []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


@app.command()
def watch(run_id: str, url: UrlOpt = DEFAULT_URL, token: TokenOpt = None) -> None:
    """Live progress from the run's event stream, until it ends (exit 1 unless completed)."""
    final = None
    with _client(url, token, timeout=httpx.Timeout(30.0, read=None)) as c:
        with c.stream("GET", f"/v1/runs/{run_id}/events") as r:
            if r.status_code >= 400:
                r.read()
                _check(r)
            for kind, ev in iter_sse(r.iter_lines()):
                d = ev.get("data", {})
                if kind == "step":
                    m = d.get("metrics", {})
                    parts = " ".join(f"{k}={m[k]:.4g}" for k in HEADLINE if k in m)
                    typer.echo(f"step {d.get('step')}: {parts}")
                elif kind == "state":
                    final = d.get("to")
                    typer.echo(f"state {d.get('from') or '-'} -> {final}"
                               + (f" ({d['error']})" if d.get("error") else ""))
                elif kind == "checkpoint":
                    typer.echo(f"checkpoint step {d.get('step')}: {d.get('path')}")
                else:
                    typer.echo(f"{kind}: {json.dumps(d)[:200]}")
    if final != "completed":
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
