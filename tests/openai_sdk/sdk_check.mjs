// The official OpenAI SDK for Node (npm `openai`, v4) against amoeba-server's HTTP API: every
// everyday request kind, asserting on the content; what the server does not serve yet must be a
// clear 400 naming the field. Run by tests/openai_sdk_test.py:
//   node sdk_check.mjs NODE_DIR BASE_URL TOKEN MODEL
// Prints one line per failed check and "openai_sdk: N passed, M failed"; exits 1 on failures.
import { createRequire } from "node:module";

const [nodeDir, baseURL, token, model] = process.argv.slice(2);
const OpenAI = createRequire(`${nodeDir}/package.json`)("openai");
const client = new OpenAI({ baseURL, apiKey: token, maxRetries: 0, timeout: 60_000 });

let passed = 0, failed = 0;
function check(cond, what) {
  if (cond) passed++;
  else { failed++; console.log(`FAIL: ${what}`); }
}
async function attempt(what, fn) {
  try { await fn(); } catch (e) { check(false, `${what}: threw ${e?.status ?? ""} ${e?.message ?? e}`); }
}
// A request the server refuses: the SDK's error class for `status`, the message naming `field`.
async function refused(what, status, field, fn) {
  try {
    await fn();
    check(false, `${what}: accepted, expected ${status}`);
  } catch (e) {
    check(e instanceof OpenAI.APIError && e.status === status && String(e.message).includes(field),
          `${what}: ${e?.status} ${e?.message}`);
  }
}
const user = [{ role: "user", content: "Say something short." }];
const greedy = { model, temperature: 0 };

await attempt("models.list", async () => {
  const ids = [];
  for await (const m of client.models.list()) ids.push(m.id);
  check(ids.includes(model), `models.list has ${model}: ${ids.slice(0, 5)}`);
});

let text = "";
await attempt("chat", async () => {
  const r = await client.chat.completions.create({ ...greedy, messages: user, max_tokens: 8 });
  text = r.choices[0].message.content;
  check(r.object === "chat.completion" && r.choices[0].message.role === "assistant" &&
        typeof text === "string" && r.usage.completion_tokens >= 1 &&
        r.usage.total_tokens === r.usage.prompt_tokens + r.usage.completion_tokens,
        `chat: ${JSON.stringify(r).slice(0, 300)}`);
});

await attempt("chat streamed with usage", async () => {
  const stream = await client.chat.completions.create({
    ...greedy, messages: user, max_tokens: 8, stream: true, stream_options: { include_usage: true } });
  let streamed = "", usage = null, finish = null;
  for await (const c of stream) {
    streamed += c.choices[0]?.delta?.content ?? "";
    finish = c.choices[0]?.finish_reason ?? finish;
    usage = c.usage ?? usage;
  }
  check(streamed === text, `streamed text == plain text: ${JSON.stringify(streamed)} vs ${JSON.stringify(text)}`);
  check(usage && usage.completion_tokens >= 1 && (finish === "length" || finish === "stop"),
        `stream usage/finish: ${JSON.stringify(usage)} ${finish}`);
});

await attempt("completions", async () => {
  const r = await client.completions.create({ ...greedy, prompt: "Once upon a time", max_tokens: 6 });
  const s = await client.completions.create({
    ...greedy, prompt: "Once upon a time", max_tokens: 6, stream: true });
  let streamed = "";
  for await (const c of s) streamed += c.choices[0]?.text ?? "";
  check(r.object === "text_completion" && r.usage.completion_tokens === 6 &&
        r.choices[0].finish_reason === "length" && streamed === r.choices[0].text,
        `completions: ${JSON.stringify(r).slice(0, 300)} / ${JSON.stringify(streamed)}`);
});

await attempt("everyday fields", async () => {
  const r = await client.chat.completions.create({
    model, messages: [{ role: "system", content: "Be brief." },
                      { role: "user", content: [{ type: "text", text: "Hi" }, { type: "text", text: "there" }] }],
    max_completion_tokens: 5, seed: 7, temperature: 0.8, top_p: 0.9, stop: ["\n\n"], user: "u-1",
    metadata: { run: "sdk" }, response_format: { type: "text" }, presence_penalty: 0.5,
    frequency_penalty: 0.5, logit_bias: { "5": -100 } });
  check(r.usage.completion_tokens <= 5 && r.usage.completion_tokens >= 1, `fields: ${JSON.stringify(r.usage)}`);
  const again = await client.chat.completions.create({
    model, messages: [{ role: "system", content: "Be brief." },
                      { role: "user", content: "Hi\nthere" }],
    max_completion_tokens: 5, seed: 7, temperature: 0.8, top_p: 0.9, stop: ["\n\n"], presence_penalty: 0.5,
    frequency_penalty: 0.5, logit_bias: { "5": -100 } });
  check(again.choices[0].message.content === r.choices[0].message.content,
        "text parts == their lines joined (same seed)");
});

await attempt("chat logprobs", async () => {
  const r = await client.chat.completions.create({
    ...greedy, messages: user, max_tokens: 6, logprobs: true, top_logprobs: 3 });
  const content = r.choices[0].logprobs?.content ?? [];
  check(content.length >= 1 && content.length <= 6, `logprobs entries: ${content.length}`);
  for (const e of content) {
    const top = e.top_logprobs;
    check(e.logprob <= 0 && top.length === 3 && top[0].logprob >= top[1].logprob &&
          top[1].logprob >= top[2].logprob && Math.abs(top[0].logprob - e.logprob) < 1e-6 &&
          Array.isArray(e.bytes), `logprob entry: ${JSON.stringify(e)}`);
  }
});

await attempt("completions echo scoring", async () => {
  const prompt = "The quick brown fox";
  const tokens = await fetch(`${baseURL.replace(/\/v1$/, "")}/tokenize`, {
    method: "POST", headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
    body: JSON.stringify({ content: prompt }) }).then((r) => r.json());
  const r = await client.completions.create({
    ...greedy, prompt, max_tokens: 0, echo: true, logprobs: 1 });
  const lp = r.choices[0].logprobs;
  check(r.choices[0].text === prompt && r.usage.completion_tokens === 0 &&
        lp.tokens.length === tokens.tokens.length && lp.token_logprobs[0] === null &&
        lp.token_logprobs.slice(1).every((v) => v <= 0) && lp.text_offset[0] === 0,
        `echo scoring: ${JSON.stringify(r).slice(0, 400)}`);
});

// Log-probabilities against a forward pass: echo scores a token-id prompt with one prefill that
// keeps every position's logits; each prefix then generates one token forced by logit_bias to be
// the prompt's next one, whose reported log-probability (taken before the bias) must agree.
await attempt("logprobs equal a forward pass", async () => {
  const ids = (await fetch(`${baseURL.replace(/\/v1$/, "")}/tokenize`, {
    method: "POST", headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
    body: JSON.stringify({ content: "The quick brown fox jumps over" }) }).then((r) => r.json())).tokens;
  const scored = await client.completions.create({
    ...greedy, prompt: ids, max_tokens: 0, echo: true, logprobs: 0 });
  const want = scored.choices[0].logprobs.token_logprobs;
  check(want.length === ids.length && want[0] === null, `scored ${JSON.stringify(want)}`);
  for (let k = 1; k < ids.length; ++k) {
    const r = await client.completions.create({ ...greedy, prompt: ids.slice(0, k), max_tokens: 1,
      logprobs: 0, logit_bias: { [String(ids[k])]: 100 } });
    const got = r.choices[0].logprobs.token_logprobs[0];
    check(Math.abs(got - want[k]) < 1e-4, `token ${k}: generated ${got} vs scored ${want[k]}`);
  }
});

await refused("unknown model", 404, "gpt-4", () =>
  client.chat.completions.create({ model: "gpt-4", messages: user }));
await attempt("n choices", async () => {
  const r = await client.chat.completions.create({
    model, messages: user, max_tokens: 6, n: 3, temperature: 1, seed: 3 });
  check(r.choices.length === 3 && r.choices.map((c) => c.index).join() === "0,1,2" &&
        new Set(r.choices.map((c) => c.message.content)).size > 1,
        `n=3: ${JSON.stringify(r.choices.map((c) => c.message.content))}`);
});
await refused("n out of range", 400, "n", () =>
  client.chat.completions.create({ ...greedy, messages: user, n: 9 }));
await attempt("json_schema", async () => {
  const schema = { type: "object", properties: { city: { type: "string", maxLength: 10 },
    rank: { type: "integer" }, ok: { type: "boolean" } }, required: ["city", "rank"],
    additionalProperties: false };
  const r = await client.chat.completions.create({ ...greedy, max_tokens: 200, messages: user,
    response_format: { type: "json_schema", json_schema: { name: "place", schema, strict: true } } });
  const text = r.choices[0].message.content;
  check(r.choices[0].finish_reason === "stop", `json_schema finish ${r.choices[0].finish_reason}: ${text}`);
  const v = JSON.parse(text);
  check(typeof v.city === "string" && v.city.length <= 10 && Number.isInteger(v.rank) &&
        Object.keys(v).every((k) => k in schema.properties), `json_schema output ${text}`);
});
await attempt("json_object streamed", async () => {
  const stream = await client.chat.completions.create({ ...greedy, max_tokens: 200, messages: user,
    stream: true, response_format: { type: "json_object" } });
  let text = "", finish = null;
  for await (const c of stream) {
    if (c.choices.length) {
      text += c.choices[0].delta.content ?? "";
      finish = c.choices[0].finish_reason ?? finish;
    }
  }
  check(text.startsWith("{"), `json_object output ${text}`);
  if (finish === "stop") check(typeof JSON.parse(text) === "object", `json_object ${text}`);
});
await refused("unsupported schema keyword", 400, "pattern", () =>
  client.chat.completions.create({ ...greedy, messages: user, response_format: { type: "json_schema",
    json_schema: { name: "x", schema: { type: "string", pattern: "a+" } } } }));
const tools = [{ type: "function", function: { name: "lookup", description: "Find a word",
  parameters: { type: "object", properties: { word: { type: "string", maxLength: 8 },
    limit: { type: "integer" } }, required: ["word", "limit"], additionalProperties: false } } }];
await attempt("tools, tool_choice required", async () => {
  const r = await client.chat.completions.create({ ...greedy, max_tokens: 800, messages: user,
    tools, tool_choice: "required", parallel_tool_calls: false });
  const m = r.choices[0].message;
  check(r.choices[0].finish_reason === "tool_calls" && m.content === null &&
        m.tool_calls?.length === 1, `tool call reply ${JSON.stringify(r.choices[0])}`);
  const args = JSON.parse(m.tool_calls[0].function.arguments);
  check(m.tool_calls[0].function.name === "lookup" && typeof args.word === "string" &&
        args.word.length <= 8 && Number.isInteger(args.limit), `arguments ${JSON.stringify(args)}`);
  // The call and its result go back into the conversation.
  const next = await client.chat.completions.create({ ...greedy, max_tokens: 16, tools,
    tool_choice: "none", messages: [...user, m,
      { role: "tool", tool_call_id: m.tool_calls[0].id, content: "found" }] });
  check(typeof next.choices[0].message.content === "string", "reply after a tool result");
});
await attempt("tool_choice auto and none", async () => {
  for (const seed of [1, 2, 3]) {
    const r = await client.chat.completions.create({ model, temperature: 1, seed, max_tokens: 400,
      messages: user, tools, tool_choice: "auto" });
    const m = r.choices[0].message;
    if (m.tool_calls) {
      check(r.choices[0].finish_reason === "tool_calls" &&
            typeof JSON.parse(m.tool_calls[0].function.arguments).word === "string", `auto call ${JSON.stringify(m)}`);
    } else {
      check(typeof m.content === "string" && !m.content.startsWith("<"), `auto text ${JSON.stringify(m)}`);
    }
  }
  const none = await client.chat.completions.create({ ...greedy, max_tokens: 8, messages: user,
    tools, tool_choice: "none" });
  check(typeof none.choices[0].message.content === "string" && !none.choices[0].message.tool_calls,
        `tool_choice none ${JSON.stringify(none.choices[0])}`);
});
await attempt("grammar (llama.cpp's extension) and streamed logprobs", async () => {
  const r = await client.completions.create({ ...greedy, prompt: "Answer:", max_tokens: 20,
    grammar: 'root ::= ("yes" | "no") "!"' });
  check(["yes!", "no!"].includes(r.choices[0].text) && r.choices[0].finish_reason === "stop",
        `grammar ${JSON.stringify(r.choices[0])}`);
  const stream = await client.chat.completions.create({ ...greedy, max_tokens: 6, messages: user,
    logprobs: true, top_logprobs: 2, stream: true });
  let entries = 0;
  for await (const c of stream) entries += c.choices[0]?.logprobs?.content?.length ?? 0;
  check(entries >= 1 && entries <= 6, `streamed logprob entries ${entries}`);
});
await attempt("tools streamed", async () => {
  const stream = await client.chat.completions.create({ ...greedy, max_tokens: 800, messages: user,
    tools, tool_choice: { type: "function", function: { name: "lookup" } }, stream: true });
  let calls = [], finish = null;
  for await (const c of stream) {
    if (!c.choices.length) continue;
    calls.push(...(c.choices[0].delta.tool_calls ?? []));
    finish = c.choices[0].finish_reason ?? finish;
  }
  check(finish === "tool_calls" && calls.length >= 1 && calls.every((t) =>
    t.function.name === "lookup" && typeof JSON.parse(t.function.arguments).word === "string"),
    `streamed calls ${JSON.stringify(calls)} ${finish}`);
});
await refused("top_logprobs out of range", 400, "top_logprobs", () =>
  client.chat.completions.create({ ...greedy, messages: user, logprobs: true, top_logprobs: 21 }));
await attempt("wrong token", async () => {
  const bad = new OpenAI({ baseURL, apiKey: "wrong", maxRetries: 0 });
  try {
    await bad.chat.completions.create({ ...greedy, messages: user });
    check(false, "wrong token accepted");
  } catch (e) {
    check(e instanceof OpenAI.PermissionDeniedError || e instanceof OpenAI.AuthenticationError,
          `wrong token: ${e?.status}`);
  }
});

console.log(`openai_sdk: ${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
