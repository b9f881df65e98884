#include "server/grpc_service.h"

#include "grpc_status.h"
#include "model/weight_format.h"
#include "proto_convert.h"
#include "reactors.h"

namespace amoeba {
namespace {

grpc::ServerUnaryReactor* Reply(grpc::CallbackServerContext* ctx, const absl::Status& s) {
  auto* r = ctx->DefaultReactor();
  r->Finish(ToGrpc(s));
  return r;
}

}  // namespace

grpc::ServerWriteReactor<v1::GenerateResponse>* AmoebaService::Generate(
    grpc::CallbackServerContext* ctx, const v1::GenerateRequest* req) {
  return NewGenerateReactor(serving_, ctx, req);
}

grpc::ServerWriteReactor<v1::FileChunk>* AmoebaService::ExportSubnet(
    grpc::CallbackServerContext* ctx, const v1::ExportSubnetRequest* req) {
  return NewExportReactor(serving_, ctx, req);
}

grpc::ServerUnaryReactor* AmoebaService::Plan(grpc::CallbackServerContext* ctx,
                                              const v1::PlanRequest* req, v1::PlanResponse* resp) {
  auto id = serving_.AssignRequestId(req->request_id());
  if (!id.ok()) return Reply(ctx, id.status());
  resp->set_request_id(*id);
  RequestContext call = ContextOf(ctx);
  call.request_id = *id;
  const PlanBudget budget = BudgetFromProto(req->budget());
  if (req->for_export()) {
    auto e = serving_.PlanExport(budget, call);
    if (!e.ok()) return Reply(ctx, e.status());
    *resp->mutable_chosen() = ToProto(e->chosen);
    resp->set_export_dtype(WeightFormatName(e->format));
    resp->set_export_file_bytes(e->file_bytes);
    resp->set_explanation(e->explanation);
    return Reply(ctx, absl::OkStatus());
  }
  auto p = serving_.Plan(budget, call);
  if (!p.ok()) return Reply(ctx, p.status());
  *resp->mutable_chosen() = ToProto(p->chosen);
  for (const auto& f : p->frontier) *resp->add_frontier() = ToProto(f);
  resp->set_explanation(p->explanation);
  return Reply(ctx, absl::OkStatus());
}

grpc::ServerUnaryReactor* AmoebaService::ListShapes(grpc::CallbackServerContext* ctx,
                                                    const v1::ListShapesRequest*,
                                                    v1::ListShapesResponse* resp) {
  auto shapes = serving_.Shapes(ContextOf(ctx));
  if (!shapes.ok()) return Reply(ctx, shapes.status());
  for (const auto& e : *shapes) *resp->add_shapes() = ToProto(e);
  return Reply(ctx, absl::OkStatus());
}

grpc::ServerUnaryReactor* AmoebaService::GetModelInfo(grpc::CallbackServerContext* ctx,
                                                      const v1::GetModelInfoRequest*,
                                                      v1::ModelInfo* resp) {
  const absl::Status auth = serving_.CheckAuth(ContextOf(ctx), false);
  if (!auth.ok()) return Reply(ctx, auth);
  const ModelInfo& m = serving_.info();
  resp->set_model_type(m.model_type);
  resp->set_num_layers(static_cast<int32_t>(m.num_layers));
  resp->set_hidden_size(static_cast<int32_t>(m.hidden_size));
  resp->set_vocab_size(static_cast<int32_t>(m.vocab_size));
  for (int64_t d : m.depths) resp->add_depths(static_cast<int32_t>(d));
  for (double w : m.widths) resp->add_widths(w);
  resp->set_has_adapters(m.has_adapters);
  resp->set_tokenizer(m.tokenizer);
  resp->set_max_context_tokens(static_cast<int32_t>(m.max_context_tokens));
  resp->set_weights_dtype(m.weights_dtype);
  return Reply(ctx, absl::OkStatus());
}

grpc::ServerUnaryReactor* AmoebaService::Tokenize(grpc::CallbackServerContext* ctx,
                                                  const v1::TokenizeRequest* req,
                                                  v1::TokenizeResponse* resp) {
  TokenizeRequest r;
  r.text = req->text();
  r.add_bos = !req->has_add_bos() || req->add_bos();  // unset: as Generate, a BOS first
  auto t = serving_.Tokenize(r, ContextOf(ctx));
  if (!t.ok()) return Reply(ctx, t.status());
  for (int32_t id : t->ids) resp->add_ids(id);
  for (auto& p : t->pieces) resp->add_pieces(std::move(p));
  return Reply(ctx, absl::OkStatus());
}

}  // namespace amoeba
