"""Computing what evaluate reports, never drawing or writing it (never imports reporting): the
systems (`systems`), their timing (`timing`), quality, choices and ratios (`selection`),
intervals and tests (`stats`), FLOPs (`flops`), the cascade policy (`cascade`, numpy only,
shared with the bundle) and its choice on validation (`cascade_choice`)."""
