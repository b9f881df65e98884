#!/usr/bin/python3
"""Renders a chat template the way transformers' apply_chat_template does (jinja2's sandboxed
environment with trim_blocks, lstrip_blocks and loop controls; tojson as json.dumps with
ensure_ascii off; raise_exception; strftime_now), once per context file, and prints a JSON list:
per context {"text": ...} or {"raised": ...} when the template refuses it.
Usage: render_reference.py TEMPLATE.jinja CONTEXT.json [CONTEXT.json ...]"""
import json
import sys
from datetime import datetime

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
env.filters["tojson"] = tojson
env.globals["raise_exception"] = raise_exception
env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
template = env.from_string(open(sys.argv[1]).read())
out = []
for path in sys.argv[2:]:
    try:
        out.append({"text": template.render(**json.load(open(path)))})
    except Exception as e:  # the template refuses this conversation (raise_exception, a type error)
        out.append({"raised": f"{type(e).__name__}: {e}"})
json.dump(out, sys.stdout, ensure_ascii=False)
