// Kept so that existing programs keep compiling: this header moved to <lorafuse/config/lora_config.h>.
#pragma once
#include <lorafuse/config/lora_config.h>
