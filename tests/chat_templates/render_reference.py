#!/usr/bin/python3
"""Renders a chat template the way transformers' apply_chat_template does (jinja2's sandboxed
environment with trim_blocks, lstrip_blocks and loop controls; tojson as json.dumps with
ensure_ascii off; raise_exception; strftime_now) and prints the result.
Usage: render_reference.py TEMPLATE.jinja CONTEXT.json (exit 3 when the template raises)."""
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
context = json.load(open(sys.argv[2]))
try:
    sys.stdout.write(template.render(**context))
except jinja2.exceptions.TemplateError as e:
    sys.stdout.write(f"raised: {e}")
    sys.exit(3)
