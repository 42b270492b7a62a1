// Kept so that existing programs keep compiling: this header moved to <lorafuse/config/adapter_options.h>.
#pragma once
#include <lorafuse/config/adapter_options.h>
