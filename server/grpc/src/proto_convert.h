// amoeba.v1 messages to and from the core's types (no validation: the core does that).
#pragma once
#include "amoeba/v1/amoeba.pb.h"
#include "server/job_result.h"
#include "server/planner.h"
#include "server/request.h"

namespace amoeba {

GenerationRequest GenerationRequestFromProto(const v1::GenerateRequest& r);
PlanBudget BudgetFromProto(const v1::Budget& b);
ExportRequest ExportRequestFromProto(const v1::ExportSubnetRequest& r);
v1::ShapeEstimate ToProto(const ShapeEstimateResult& e);
v1::FinishReason ToProto(FinishReason r);
void SetShape(const Shape& s, v1::Shape* out);

}  // namespace amoeba
