"""What people read: plots (`plots`), Markdown tables (`markdown_tables`, `tables`), HTML pages
(`pages`), evaluate's results folder (`results`) and console lines (`console`), the model card
(`model_card`), `still report` across experiments (`experiments`) and W&B (`tracking`)."""
