// amoeba-cli: talks to amoeba-server. Exit codes: 0 ok, 2 bad input (usage or INVALID_ARGUMENT),
// 1 any other failure.
#include <google/protobuf/util/json_util.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <optional>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "client/amoeba_client.h"

namespace {
using namespace amoeba;

std::string ToJson(const google::protobuf::Message& m) {
  std::string s;
  google::protobuf::util::JsonPrintOptions o;
  o.always_print_primitive_fields = true;
  (void)google::protobuf::util::MessageToJsonString(m, &s, o);
  return s;
}

int Fail(const grpc::Status& s) {
  std::fprintf(stderr, "error: %s (%d)\n", s.error_message().c_str(),
               static_cast<int>(s.error_code()));
  return s.error_code() == grpc::StatusCode::INVALID_ARGUMENT ? 2 : 1;
}

struct ShapeFlags {
  int depth = 0;
  double width = 0;
};

struct BudgetFlags {
  int64_t max_params = 0, max_memory = 0;
  double max_decode_ms = 0, max_prefill_ms = 0, bandwidth = 0, gflops = 0;
  int prompt_tokens = 0;
  bool any() const {
    return max_params || max_memory || max_decode_ms || max_prefill_ms || bandwidth || gflops;
  }
  void Fill(v1::Budget* b) const {
    if (max_params) b->set_max_params(max_params);
    if (max_memory) b->set_max_memory_bytes(max_memory);
    if (max_decode_ms) b->set_max_decode_ms_per_token(max_decode_ms);
    if (max_prefill_ms) b->set_max_prefill_ms(max_prefill_ms);
    if (prompt_tokens) b->set_prompt_tokens(prompt_tokens);
    if (bandwidth) b->mutable_platform()->set_memory_bandwidth_gbs(bandwidth);
    if (gflops) b->mutable_platform()->set_compute_gflops(gflops);
  }
  void Add(CLI::App* c) {
    c->add_option("--budget-params", max_params, "Max parameters");
    c->add_option("--budget-memory", max_memory, "Max memory bytes (weights + KV)");
    c->add_option("--budget-latency-ms", max_decode_ms, "Max decode ms per token");
    c->add_option("--budget-prefill-ms", max_prefill_ms, "Max prefill ms");
    c->add_option("--prompt-tokens", prompt_tokens, "Prompt length for the prefill estimate");
    c->add_option("--platform-bandwidth-gbs", bandwidth,
                  "Client memory bandwidth (roofline estimate)");
    c->add_option("--platform-gflops", gflops, "Client compute (roofline estimate)");
  }
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"amoeba-cli: client for amoeba-server"};
  app.require_subcommand(1);
  client::ClientOptions co;
  bool json = false;
  app.add_option("--target", co.target, "Server address")
      ->envname("AMOEBA_TARGET")
      ->capture_default_str();
  app.add_flag("--tls", co.tls, "Use TLS");
  app.add_option("--ca-cert", co.ca_cert_file, "PEM root certificates for TLS");
  app.add_option("--token", co.token, "Bearer token")->envname("AMOEBA_TOKEN");
  app.add_option("--timeout", co.timeout_s, "Per-call deadline in seconds");
  app.add_flag("--json", json, "Print JSON");

  // generate
  auto* gen = app.add_subcommand("generate", "Stream a completion");
  std::string prompt;
  ShapeFlags shape;
  BudgetFlags budget;
  int max_new = 64;
  float temperature = 0, top_p = 1, rep = 1, min_p = 0, presence = 0, frequency = 0;
  std::vector<std::string> logit_bias;
  int top_k = 0;
  uint64_t seed = 0;
  std::vector<std::string> stop;
  std::string shape_str;
  gen->add_option("prompt", prompt, "Prompt text")->required();
  gen->add_option("--shape", shape_str, "depth=D,width=W");
  budget.Add(gen);
  gen->add_option("--max-new-tokens,-n", max_new)->capture_default_str();
  gen->add_option("--temperature", temperature)->capture_default_str();
  gen->add_option("--top-k", top_k)->capture_default_str();
  gen->add_option("--top-p", top_p)->capture_default_str();
  gen->add_option("--repetition-penalty", rep)->capture_default_str();
  gen->add_option("--seed", seed)->capture_default_str();
  gen->add_option("--min-p", min_p, "Keep tokens with p >= min_p * p_max (0 = off)")
      ->capture_default_str();
  gen->add_option("--presence-penalty", presence, "OpenAI's, [-2, 2]")->capture_default_str();
  gen->add_option("--frequency-penalty", frequency, "OpenAI's, [-2, 2]")->capture_default_str();
  gen->add_option("--logit-bias", logit_bias,
                  "TOKEN_ID=BIAS added to that token's logit (repeatable)");
  gen->add_option("--stop", stop, "Stop string (repeatable)");
  int logprobs = -1;
  gen->add_option("--logprobs", logprobs,
                  "Each new token's log-probability with this many alternatives (0..20), "
                  "listed after the text (with --json: in each message)");
  std::string grammar_file, schema_file;
  bool json_object = false;
  auto* grammar_opt =
      gen->add_option("--grammar", grammar_file, "Constrain the output to a GBNF grammar (a file)");
  auto* schema_opt = gen->add_option("--json-schema", schema_file,
                                     "Constrain the output to JSON valid under a schema (a file)");
  auto* object_opt =
      gen->add_flag("--json-object", json_object, "Constrain the output to a JSON object");
  grammar_opt->excludes(schema_opt)->excludes(object_opt);
  schema_opt->excludes(object_opt);
  std::optional<int> priority;
  gen->add_option("--priority", priority,
                  "Admission class, -100..100 (default 0): while the shape's slots are all taken, "
                  "higher classes start first")
      ->check(CLI::Range(-100, 100));
  std::string speculate;
  int draft_tokens = 0;
  gen->add_option("--speculate", speculate,
                  "auto | off | a draft shape depth=D,width=W (default: the server's setting)");
  gen->add_option("--draft-tokens", draft_tokens, "Drafted tokens per check, 1..8 (with a draft)")
      ->check(CLI::Range(1, 8));

  auto* plan = app.add_subcommand("plan", "Pick the best shape for a budget");
  BudgetFlags plan_budget;
  plan_budget.Add(plan);
  bool plan_for_export = false;
  plan->add_flag("--for-export", plan_for_export,
                 "Plan a GGUF file for the client platform (shape and dtype)");
  auto* shapes = app.add_subcommand("shapes", "List the shapes with their estimates");
  auto* info = app.add_subcommand("info", "Model information");
  auto* health = app.add_subcommand("health", "grpc.health.v1 status");
  auto* tok = app.add_subcommand("tokenize", "Token ids of a text");
  std::string tok_text;
  tok->add_option("text", tok_text)->required();
  auto* exp = app.add_subcommand(
      "export", "Download one shape as an HF directory or a GGUF file for llama.cpp");
  std::string out_dir, exp_shape, exp_format = "hf", exp_dtype;
  bool uniform = false, no_adapters = false;
  exp->add_option("--shape", exp_shape, "depth=D,width=W (or a budget: the planner picks)");
  BudgetFlags exp_budget;
  exp_budget.Add(exp);
  exp->add_flag("--no-adapters", no_adapters,
                "The base subnet, without the tuned SMoL adapters merged in");
  exp->add_option("--out", out_dir, "Output directory (holds model.gguf with --format gguf)")
      ->required();
  exp->add_option("--format", exp_format, "hf | gguf")->capture_default_str();
  exp->add_option("--dtype", exp_dtype,
                  "hf: f32 (default) | f16 | bf16; gguf: f32 | f16 (default) | q8_0 | q4_0");
  exp->add_flag("--uniform-width", uniform,
                "Standard LlamaForCausalLM (same width in every layer)");

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    app.exit(e);
    return 2;
  }
  auto parse_shape = [](const std::string& s, v1::Shape* out) -> bool {
    for (size_t pos = 0; pos < s.size();) {
      size_t end = s.find(',', pos);
      if (end == std::string::npos) end = s.size();
      const std::string kv = s.substr(pos, end - pos);
      const size_t eq = kv.find('=');
      if (eq == std::string::npos) return false;
      const std::string k = kv.substr(0, eq), v = kv.substr(eq + 1);
      try {
        if (k == "depth")
          out->set_depth(std::stoi(v));
        else if (k == "width")
          out->set_width(std::stod(v));
        else
          return false;
      } catch (...) {
        return false;
      }
      pos = end + 1;
    }
    return true;
  };
  client::Client c(co);
  if (gen->parsed()) {
    v1::GenerateRequest req;
    req.set_text(prompt);
    if (!shape_str.empty()) {
      if (!parse_shape(shape_str, req.mutable_shape())) {
        std::fprintf(stderr, "error: --shape: expected depth=D,width=W\n");
        return 2;
      }
    } else if (budget.any()) {
      budget.Fill(req.mutable_budget());
    }
    req.set_max_new_tokens(max_new);
    if (priority) req.set_priority(*priority);
    auto* s = req.mutable_sampling();
    s->set_temperature(temperature);
    s->set_top_k(top_k);
    s->set_top_p(top_p);
    s->set_repetition_penalty(rep);
    s->set_seed(seed);
    if (min_p != 0) s->set_min_p(min_p);
    if (presence != 0) s->set_presence_penalty(presence);
    if (frequency != 0) s->set_frequency_penalty(frequency);
    for (const std::string& lb : logit_bias) {
      const size_t eq = lb.find('=');
      int32_t id = 0;
      float bias = 0;
      if (eq == std::string::npos || !absl::SimpleAtoi(lb.substr(0, eq), &id) ||
          !absl::SimpleAtof(lb.substr(eq + 1), &bias)) {
        std::fprintf(stderr, "--logit-bias: \"%s\" is not TOKEN_ID=BIAS\n", lb.c_str());
        return 2;
      }
      (*s->mutable_logit_bias())[id] = bias;
    }
    for (const auto& st : stop) req.add_stop(st);
    if (!speculate.empty()) req.set_speculate(speculate);
    if (draft_tokens > 0) req.set_draft_tokens(draft_tokens);
    if (logprobs >= 0) req.set_logprobs(logprobs);
    for (auto [file, setter] :
         {std::pair<const std::string*, void (v1::GenerateRequest::*)(const std::string&)>{
              &grammar_file, &v1::GenerateRequest::set_grammar},
          {&schema_file, &v1::GenerateRequest::set_json_schema}}) {
      if (file->empty()) continue;
      std::ifstream in(*file, std::ios::binary);
      if (!in) {
        std::fprintf(stderr, "cannot read %s\n", file->c_str());
        return 2;
      }
      std::stringstream text;
      text << in.rdbuf();
      (req.*setter)(text.str());
    }
    if (json_object) req.set_json_object(true);
    std::vector<v1::TokenLogprob> token_logprobs;
    v1::GenerateResponse last;
    if (!json) std::fputs(prompt.c_str(), stdout);
    grpc::Status st = c.Generate(req, [&](const v1::GenerateResponse& r) {
      if (json) {
        std::printf("%s\n", ToJson(r).c_str());
      } else {
        std::fwrite(r.text().data(), 1, r.text().size(), stdout);
      }
      std::fflush(stdout);
      token_logprobs.insert(token_logprobs.end(), r.logprobs().begin(), r.logprobs().end());
      last = r;
    });
    if (!st.ok()) return Fail(st);
    if (!json) {
      std::printf("\n");
      std::fflush(stdout);
      std::fprintf(stderr,
                   "[shape depth=%d,width=%g | %d tokens, finish=%s | ttft %.1f ms | %.1f tok/s]\n",
                   last.shape().depth(), last.shape().width(), last.usage().completion_tokens(),
                   v1::FinishReason_Name(last.finish_reason()).c_str(),
                   last.timings().time_to_first_token_ms(), last.timings().decode_tokens_per_s());
      // One line per new token: its id and log-probability, then the alternatives.
      for (size_t i = 0; i < token_logprobs.size(); ++i) {
        const v1::TokenLogprob& t = token_logprobs[i];
        std::string top;
        for (const v1::TopLogprob& a : t.top())
          top += absl::StrCat(" ", a.token_id(), ":", absl::SixDigits(a.logprob()));
        std::fprintf(stderr, "[logprob %zu: token %d %s%s%s]\n", i, t.token_id(),
                     absl::StrCat(absl::SixDigits(t.logprob())).c_str(),
                     top.empty() ? "" : " | top", top.c_str());
      }
      if (last.has_speculation()) {
        const auto& sp = last.speculation();
        std::fprintf(stderr,
                     "[draft depth=%d,width=%g | %d of %d drafted tokens kept, %.2f per check of "
                     "up to %d]\n",
                     sp.draft().depth(), sp.draft().width(), sp.accepted_tokens(),
                     sp.drafted_tokens(), sp.mean_accepted(), sp.draft_tokens());
      }
    }
    return 0;
  }
  if (plan->parsed()) {
    v1::PlanRequest req;
    plan_budget.Fill(req.mutable_budget());
    req.set_for_export(plan_for_export);
    v1::PlanResponse resp;
    grpc::Status st = c.Plan(req, &resp);
    if (!st.ok()) return Fail(st);
    if (json)
      std::printf("%s\n", ToJson(resp).c_str());
    else
      std::printf("%s\n", resp.explanation().c_str());
    return 0;
  }
  if (shapes->parsed()) {
    v1::ListShapesResponse resp;
    grpc::Status st = c.ListShapes(&resp);
    if (!st.ok()) return Fail(st);
    if (json) {
      std::printf("%s\n", ToJson(resp).c_str());
    } else {
      std::printf("%-6s %-7s %-12s %-14s %-10s %s\n", "depth", "width", "params", "decode ms/tok",
                  "latency", "quality");
      for (const auto& e : resp.shapes()) {
        // Perplexities travel negated (higher quality is better); print the perplexity itself.
        const bool ppl = e.quality_source().find("perplexity") != std::string::npos;
        std::printf("%-6d %-7g %-12lld %-14.3f %-10s %s %g\n", e.shape().depth(), e.shape().width(),
                    static_cast<long long>(e.params()), e.decode_ms_per_token(),
                    e.latency_source().c_str(), e.quality_source().c_str(),
                    ppl ? -e.quality() : e.quality());
      }
    }
    return 0;
  }
  if (info->parsed()) {
    v1::ModelInfo resp;
    grpc::Status st = c.GetModelInfo(&resp);
    if (!st.ok()) return Fail(st);
    std::printf("%s\n", json ? ToJson(resp).c_str() : resp.DebugString().c_str());
    return 0;
  }
  if (health->parsed()) {
    std::string status;
    grpc::Status st = c.Health(&status);
    if (!st.ok()) return Fail(st);
    std::printf("%s\n", status.c_str());
    return status == "SERVING" ? 0 : 1;
  }
  if (tok->parsed()) {
    v1::TokenizeRequest req;
    req.set_text(tok_text);
    v1::TokenizeResponse resp;
    grpc::Status st = c.Tokenize(req, &resp);
    if (!st.ok()) return Fail(st);
    std::printf("%s\n", ToJson(resp).c_str());
    return 0;
  }
  if (exp->parsed()) {
    v1::ExportSubnetRequest req;
    if (exp_shape.empty()) {
      // Budget → file: the planner picks the shape and the GGUF dtype.
      if (!exp_budget.any()) {
        std::fprintf(stderr, "error: export needs --shape or a budget (--budget-memory, ...)\n");
        return 2;
      }
      v1::PlanRequest preq;
      exp_budget.Fill(preq.mutable_budget());
      preq.set_for_export(true);
      v1::PlanResponse plan_resp;
      grpc::Status st = c.Plan(preq, &plan_resp);
      if (!st.ok()) return Fail(st);
      std::printf("%s\n", plan_resp.explanation().c_str());
      *req.mutable_shape() = plan_resp.chosen().shape();
      exp_format = "gguf";
      exp_dtype = plan_resp.export_dtype();
      exp_shape = absl::StrCat("depth=", req.shape().depth(), ",width=", req.shape().width());
    } else if (!parse_shape(exp_shape, req.mutable_shape())) {
      std::fprintf(stderr, "error: --shape: expected depth=D,width=W\n");
      return 2;
    }
    req.set_uniform_width(uniform);
    req.set_no_adapters(no_adapters);
    req.set_format(exp_format);
    req.set_dtype(exp_dtype);
    grpc::Status st = c.Export(req, out_dir);
    if (!st.ok()) return Fail(st);
    std::printf("exported %s to %s (every file's SHA-256 verified)\n", exp_shape.c_str(),
                out_dir.c_str());
    return 0;
  }
  return 2;
}
