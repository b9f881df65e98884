#include <atomic>
#include <memory>

#include "grpc_status.h"
#include "proto_convert.h"
#include "reactors.h"

namespace amoeba {
namespace {

// The core stages the export on one of its workers and calls back; the reactor then streams the
// chunks. The staging directory goes with the stream, in OnDone, which gRPC calls on every exit
// path (done, error, client cancel, shutdown); Finish is called exactly once.
class ExportReactor : public grpc::ServerWriteReactor<v1::FileChunk> {
 public:
  ExportReactor(Serving& serving, grpc::CallbackServerContext* ctx,
                const v1::ExportSubnetRequest* req) {
    auto id = serving.StartExport(ExportRequestFromProto(*req), ContextOf(ctx), cancelled_,
                                  [this](absl::StatusOr<std::unique_ptr<ExportStream>> s) {
                                    if (!s.ok()) return Finish(ToGrpc(s.status()));
                                    stream_ = std::move(*s);
                                    Next();
                                  });
    if (!id.ok()) Finish(ToGrpc(id.status()));
  }

  void OnCancel() override { *cancelled_ = true; }

  void OnWriteDone(bool ok) override {
    if (!ok || *cancelled_)
      return Finish(grpc::Status(grpc::StatusCode::CANCELLED, "export cancelled"));
    Next();
  }

  void OnDone() override { delete this; }

 private:
  void Next() {
    ExportChunk c;
    auto more = stream_->Next(c);
    if (!more.ok()) return Finish(ToGrpc(more.status()));
    if (!*more) return Finish(grpc::Status::OK);
    chunk_.Clear();
    chunk_.set_path(std::move(c.path));
    chunk_.set_offset(c.offset);
    chunk_.set_total_size(c.total_size);
    chunk_.set_data(std::move(c.data));
    chunk_.set_last_chunk(c.last_chunk);
    if (c.last_chunk) chunk_.set_sha256(c.sha256);
    StartWrite(&chunk_);
  }

  std::shared_ptr<std::atomic<bool>> cancelled_ = std::make_shared<std::atomic<bool>>(false);
  std::unique_ptr<ExportStream> stream_;
  v1::FileChunk chunk_;
};

}  // namespace

grpc::ServerWriteReactor<v1::FileChunk>* NewExportReactor(Serving& serving,
                                                          grpc::CallbackServerContext* ctx,
                                                          const v1::ExportSubnetRequest* req) {
  return new ExportReactor(serving, ctx, req);
}

}  // namespace amoeba
