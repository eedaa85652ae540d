"""The allowed values of settings checked in more than one place, defined once and free of heavy imports (the
command line lists them in --help without loading torch)."""

REVERSE_KL_TOP_1_MODES = ("sampled", "argmax")  # DistillationConfig.reverse_kl_top_1_mode
TEACHER_PROTOCOLS = ("protege", "openai")  # DistillationConfig.teacher_server_protocol
LOGPROB_FORMATS = ("json", "binary", "compact")  # teacher server payloads of top-k log-probs
HIDDEN_FORMAT = "hidden"  # the teacher server payload of final hidden states (the loss applies the LM head)
RESPONSE_FORMATS = (*LOGPROB_FORMATS, HIDDEN_FORMAT)  # teacher_server_response_format
HIDDEN_DTYPES = ("float16", "bfloat16", "float32")  # wire dtypes of hidden states (teacher_server_hidden_dtype)
VLLM_MODES = ("colocate", "server")  # DistillationConfig.vllm_mode
PROMPT_TRUNCATIONS = ("middle", "left", "error")  # DistillationConfig.prompt_truncation
DTYPE_NAMES = ("float32", "bfloat16", "float16", "auto")  # weights dtypes by name (init kwargs, serve-teacher)
API_KEY_VARIABLE = "PROTEGE_TEACHER_API_KEY"  # the teacher server's key: serve-teacher --api-key, the trainer's client
STUDENT_API_KEY_VARIABLE = "PROTEGE_STUDENT_API_KEY"  # the same for serve-student and vllm_server_api_key


def setting_error(field_name: str, value, allowed: str) -> ValueError:
    """The one error for a setting whose value is not allowed: it names the field, the value and what is allowed."""
    return ValueError(f"{field_name}={value!r} is not allowed: {allowed}.")


ON_POLICY_OBJECTIVES = ("divergence", "policy_gradient")  # DistillationConfig.on_policy_objective
