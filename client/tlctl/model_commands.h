// tlctl's commands for models, training jobs and classification.
#ifndef TLSERVE_CLIENT_TLCTL_MODEL_COMMANDS_H_
#define TLSERVE_CLIENT_TLCTL_MODEL_COMMANDS_H_

#include <functional>
#include <map>
#include <string>

#include "client/lib/client.h"
#include "client/tlctl/args.h"

namespace tlserve {

using Command = std::function<int(Client&, const Args&)>;

// create-model, models, describe-model, delete-model, unfreeze, freeze,
// classify; and the job commands.
void AddModelCommands(std::map<std::string, Command>& commands);
// train, jobs, watch, cancel (job_commands.cc).
void AddJobCommands(std::map<std::string, Command>& commands);
// evaluate, serve, thresholds, suggest (result_commands.cc).
void AddResultCommands(std::map<std::string, Command>& commands);

}  // namespace tlserve

#endif  // TLSERVE_CLIENT_TLCTL_MODEL_COMMANDS_H_
